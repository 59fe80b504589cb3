"""``POST /v1/images/variations`` and the signed image URLs it hands out.

The handler reads top to bottom in the order a request lives: authenticate, parse,
admit, look up the cache, generate what is missing, store, answer. Every refusal is an
:class:`ApiError` raised on the way; the middleware in :mod:`gateway.app` renders it,
audits it and counts it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import time
from functools import partial

from aiohttp import web

from gateway import png, upload
from gateway.cache import CacheResult, Fresh, cache_key, policy_from_header
from gateway.config import ServerConfig
from gateway.errors import ApiError
from gateway.generation import NormaliseClock, VariationRequest, normalise_clock
from gateway.keys import (
    ANSWER_WAITS_FOR,
    AUDIT_RECORD,
    AUTH,
    BACKEND_SECONDS,
    CACHE,
    CONFIG,
    IMAGES,
    METRICS,
    PIXEL_HASHES,
    QUOTA,
    RENDERER,
    ROUTER,
    UPLOAD_BUDGET,
    USER_KEY,
)
from gateway.quota import QuotaStore, Reservation, budget_used, ratelimit_headers

_ZERO_SUFFIX = re.compile(r"bytes=-0+", re.ASCII | re.IGNORECASE)


def end_user_hash(key: bytes, member: str, user: str | None) -> str | None:
    """What upstream sees for ``user``: correlatable, but no member identity in it."""
    if user is None:
        return None
    mac = hmac.new(key, f"{member}\0{user}".encode(), hashlib.sha256).hexdigest()
    return "vgu-" + mac[:32]


def seed_for(pixels_sha256: str, offset: int) -> int:
    """Pool position ``offset`` of an image always gets the same seed; -1 means fresh."""
    if offset < 0:
        return int.from_bytes(hashlib.sha256(str(time.time_ns()).encode()).digest()[:4], "big")
    return (int(pixels_sha256[:8], 16) + offset) & 0x7FFFFFFF


def base_url(request: web.Request, server: ServerConfig) -> str:
    """Where image URLs point: ``server.public_base_url``, else the request's own origin.

    A ``Host`` outside ``server.allowed_hosts`` (when set) is refused before anything
    is read or charged: a link minted for it would send the member's images, and
    whoever follows them, to a host the admin never named. The URL memo is keyed by
    this base, so it never hands out a link minted for another host either.
    """
    if not server.host_allowed(request.host):
        shown = request.host[:100].encode("unicode_escape").decode("ascii")
        raise ApiError(400, f"This gateway does not answer for the host '{shown}' (the "
                       "request's Host header); use its address.", code="invalid_host")
    if server.public_base_url:
        return server.public_base_url.rstrip("/")
    return f"{request.scheme}://{request.host}"


async def create_variation(request: web.Request) -> web.StreamResponse:
    app = request.app
    config, router, quota, metrics = app[CONFIG], app[ROUTER], app[QUOTA], app[METRICS]
    record = request[AUDIT_RECORD]
    loop = asyncio.get_running_loop()

    # Authenticate first: a stranger's body is never read.
    principal = app[AUTH].member(request)
    record.member = principal.name
    base = base_url(request, config.server)

    # Admit before the body is read (blocked users, the minute window, the in-flight
    # limit): a member at their limit gets 429 with their upload still unread, so
    # 600 held-open uploads from one member hold 2 bodies, not 600.
    async with quota.admit(principal):
        # Parse: the form (its raw fields are audited even if they are refused), then the
        # PNG container (no pixels decoded yet). The body is read within the gateway-wide
        # budget of bodies held at once, given back once the parts are split out.
        async with app[UPLOAD_BUDGET].hold(upload.UploadBudget.bytes_for(request)):
            image, fields = await upload.read_fields(request,
                                                     config.server.read_timeout_seconds)
        record.end_user = upload.for_audit(fields.get("user"))
        record.size, record.model = upload.for_audit(fields.get("size")), upload.for_audit(
            fields.get("model"))
        if image is not None:  # hashed before validation: refused requests name it too
            record.image_sha256 = app[PIXEL_HASHES].sha256(image)
            record.upload_bytes = len(image)
        form = upload.validate(image, fields, router.models)
        record.n, record.size, record.model = form.n, form.size_label, form.model
        record.end_user = form.user
        metrics.upload_bytes.observe(len(form.image))
        # A re-sent upload (the usual cache hit) was inspected and decoded before.
        known = app[PIXEL_HASHES].get(record.image_sha256)
        info = known.info if known is not None else png.inspect(form.image)
        policy = policy_from_header(request.headers.get("Cache-Control"))
        hashed_user = end_user_hash(app[USER_KEY], principal.name, form.user)
        record.end_user_hash = hashed_user

        # The pixel hash keys the cache; a request that bypasses it skips the decode (its
        # pixel data is still checked once: a corrupt upload is a 400, never sent on).
        key, pixels_sha256 = "", ""
        hashes = app[PIXEL_HASHES]
        make_source = partial(png.source_without_hash, form.image, info,
                              record.image_sha256, hashes.checked(record.image_sha256))
        if app[CACHE].enabled and policy != "no-store":
            if known is None:
                decoded = await loop.run_in_executor(None, png.decode, form.image, info,
                                                     record.image_sha256)
                known = png.Known(info, decoded.pixels_sha256)
                hashes.put(record.image_sha256, known)
                make_source = decoded.to_source
            pixels_sha256 = known.pixels_sha256
            key = cache_key(pixels_sha256, form.size, form.model, router.identity(form.model))
        # Held at the dearest backend the request may reach; charged at the price of the
        # backend that generated (or its reported token usage).
        price = config.price_ceiling(form.model, form.size_label)
        reservation: Reservation | None = None
        charge: DeliveredCharge | None = None
        spent = 0.0

        async def generate(count: int, offset: int) -> Fresh:
            nonlocal reservation, charge, spent
            reservation = await quota.reserve(principal, count, price * count,
                                              form.size_label)
            source = await loop.run_in_executor(None, make_source)
            hashes.mark_checked(record.image_sha256)
            job = VariationRequest(source, count, form.size, hashed_user,
                                   record.request_id, seed_for(pixels_sha256, offset))
            started = time.perf_counter()
            normalising = NormaliseClock()
            try:
                # A client that leaves now cancels this: the backend stops what it can
                # (procedural workers, ComfyUI prompts) and the reservation is refunded.
                with normalise_clock() as normalising:
                    result = await router.generate(form.model, job)
            finally:  # failed attempts and fallbacks are the backends' time too; turning
                # their answers into PNGs is the gateway's (request_overhead_seconds)
                _add_backend_time(request, max(
                    0.0, time.perf_counter() - started - normalising.seconds))
            # Delivered: the cache charges these images and then pools them in a task
            # of its own, whether or not the client is still there (nothing awaits
            # between here and its start), so none is ever served (to a re-sent upload,
            # or to a coalesced waiter) without having been paid for.
            record.backend = result.backend
            cost_now = config.backend(result.backend).cost(form.size_label, count,
                                                           result.usage)
            spent += cost_now
            record.images_charged, record.cost_usd = count, round(spent, 6)
            charge = DeliveredCharge(quota, reservation, count, round(cost_now, 6))
            if result.usage is not None:
                record.usage_input_tokens = (result.usage.text_input_tokens
                                             + result.usage.image_input_tokens)
                record.usage_output_tokens = result.usage.output_tokens
            metrics.images_generated.labels(result.backend, form.size_label).inc(count)
            # A fallback's images answer now but are not what the key names: not pooled.
            return Fresh(result.images, keep=router.is_first(form.model, result.backend),
                         charge=charge)

        # Look up the cache, generating only what is missing; store (and sign) what we
        # answer. Images are charged as the backend delivers them (see generate): a
        # failure or a disconnect (cancellation) before that refunds the reservation;
        # after it, the charge completes (and a failed charge is refunded by its
        # callback), so the audit can say what the ledger holds.
        try:
            result: CacheResult
            async with app[CACHE].serve(key, form.n, policy, generate,
                                        partial(_add_backend_time, request)) as result:
                data = app[RENDERER].from_memory(result.items, form.response_format, base)
                if data is None:
                    data = await loop.run_in_executor(
                        None, app[RENDERER].render, result.items, form.response_format, base)
        except BaseException:
            if reservation is not None and charge is None:  # nothing was delivered
                record.images_charged, record.cost_usd = 0, 0.0
                await quota.refund(reservation)
            elif charge is not None and charge.failed():  # refunded by the cache
                record.images_charged, record.cost_usd = 0, 0.0
            raise
        cost = round(spent, 6) if result.generated else 0.0
        # Committed together with the audit record: the answer waits for both.
        request[ANSWER_WAITS_FOR].append(
            quota.count_request(principal, cache_hit=result.generated == 0))
        statuses = await quota.usage(principal)

    record.cache = result.status
    record.images_charged = result.generated
    record.cost_usd = cost
    user_label = metrics.user_label(principal.name)
    metrics.cache_lookups.labels(result.status.lower()).inc()
    served_from_cache = form.n - result.generated if result.status != "BYPASS" else 0
    if served_from_cache:
        metrics.images_from_cache.labels(form.size_label).inc(served_from_cache)
        metrics.cache_saved_usd.inc(price * served_from_cache)
    if result.generated:
        metrics.images_by_user.labels(user_label).inc(result.generated)
        metrics.spend_usd.labels(user_label).inc(cost)
    metrics.user_budget_ratio.labels(user_label).set(budget_used(statuses))

    # Answer.
    headers = {"X-Cache": result.status, **ratelimit_headers(statuses)}
    parts = [b'{"created":%d,"data":' % int(time.time()), *data, b"}"]
    if sum(len(p) for p in parts) < PartsResponse.JOIN_BELOW:
        return web.Response(body=b"".join(parts), content_type="application/json",
                            headers=headers)
    return PartsResponse(parts, headers)


class DeliveredCharge:
    """The ledger commit of images a backend delivered (:class:`gateway.cache.Charge`).

    The cache begins it between writing the images' files and indexing them, in a task
    that outlives the request: so images are charged to the request that generated
    them, connected or not, and then pooled. A commit that fails, or images whose store
    failed before the charge began, give the reservation back.
    """

    def __init__(self, quota: QuotaStore, reservation: Reservation, images: int,
                 cost: float) -> None:
        self._quota, self._reservation = quota, reservation
        self._images, self._cost = images, cost
        self._commit: asyncio.Future[None] | None = None
        self._dropped = False

    def begin(self) -> asyncio.Future[None]:
        if self._commit is None:
            if self._dropped:
                raise RuntimeError("a dropped charge cannot begin")
            self._commit = asyncio.ensure_future(
                self._quota.commit(self._reservation, self._images, self._cost))
            self._commit.add_done_callback(self._refund_if_failed)
        return self._commit

    def drop(self) -> None:
        if self._commit is None and not self._dropped:
            self._dropped = True
            self._quota.refund_soon(self._reservation)

    def failed(self) -> bool:
        """Whether the images are known not to be charged (dropped, or a failed commit);
        a charge still under way, or not yet begun by the cache, is not."""
        commit = self._commit
        if commit is None:
            return self._dropped
        return commit.done() and (commit.cancelled() or commit.exception() is not None)

    def _refund_if_failed(self, commit: asyncio.Future[None]) -> None:
        """A failed commit gives the hold back: nobody else would, once the client left."""
        if commit.cancelled() or commit.exception() is not None:
            self._quota.refund_soon(self._reservation)


def _add_backend_time(request: web.Request, seconds: float) -> None:
    """Time spent on backends, or waiting for an identical request's call, is not the
    gateway's overhead."""
    request[BACKEND_SECONDS] += seconds


class PartsResponse(web.StreamResponse):
    """A JSON body sent part by part: a large ``b64_json`` element goes to the socket as
    the memoised bytes object itself, never copied into a joined body (and then again
    into aiohttp's headers-plus-body write) first. Small bodies are joined: one send."""

    JOIN_BELOW = 64 * 1024

    def __init__(self, parts: list[bytes], headers: dict[str, str]) -> None:
        super().__init__(headers=headers)
        self.content_type = "application/json"
        self.content_length = sum(len(p) for p in parts)
        self._parts = parts

    async def write_eof(self, data: bytes = b"") -> None:
        parts, self._parts = self._parts, []
        small: list[bytes] = []
        for part in parts:
            if len(part) < self.JOIN_BELOW:
                small.append(part)
                continue
            if small:
                await self.write(b"".join(small))
                small = []
            await self.write(part)
        await super().write_eof(b"".join([*small, data]))


async def get_image(request: web.Request) -> web.StreamResponse:
    """``GET /v1/images/files/{id}.png?expires=&signature=``: a signed, expiring URL."""
    store = request.app[IMAGES]
    image_id = request.match_info["image_id"]
    path = await store.fetch(image_id, request.query.get("expires", ""),
                         request.query.get("signature", ""))
    expires = int(request.query["expires"])
    headers = {
        "Content-Type": "image/png",
        "Cache-Control": f"private, max-age={max(0, expires - int(time.time()))}",
    }
    # FileResponse would answer an unsatisfiable or malformed range itself (a bare 416).
    try:
        start = request.http_range.start
    except ValueError:
        # A malformed (or multi-part) Range is ignored, as RFC 9110 allows: the whole file.
        data = await asyncio.get_running_loop().run_in_executor(None, path.read_bytes)
        return web.Response(body=data, headers=headers)
    # bytes=-0 asks for the last zero bytes: aiohttp reads it as start=-0, the whole
    # file, but RFC 9110 (14.1.1) makes a zero suffix length unsatisfiable.
    if (start is not None and start >= path.stat().st_size) or _ZERO_SUFFIX.fullmatch(
            request.headers.get("Range", "")):
        raise ApiError(416, "The requested byte range is outside this image.",
                       code="range_not_satisfiable")
    return web.FileResponse(path, headers=headers)
