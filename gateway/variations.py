"""``POST /v1/images/variations`` and the signed image URLs it hands out.

The handler reads top to bottom in the order a request lives: authenticate, parse,
admit, look up the cache, generate what is missing, store, answer. Every refusal is an
:class:`ApiError` raised on the way; the middleware in :mod:`gateway.app` renders it,
audits it and counts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import re
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from functools import partial

from aiohttp import web

from gateway import png, upload
from gateway.auth import Principal
from gateway.backends.base import Controls
from gateway.cache import CacheResult, Fresh, cache_key, policy_from_header
from gateway.charging import Charge, counted
from gateway.config import ServerConfig
from gateway.errors import ApiError
from gateway.generation import NormaliseClock, SourceImage, VariationRequest, normalise_clock
from gateway.images import Item
from gateway.keys import (
    AUDIT_RECORD,
    AUTH,
    BACKEND_SECONDS,
    CACHE,
    IMAGES,
    METRICS,
    PIXEL_HASHES,
    QUOTA,
    RENDERER,
    UPLOAD_BUDGET,
    USER_KEY,
    WRITES,
    snapshot,
)
from gateway.metrics import Metrics
from gateway.quota import LimitStatus, budget_used, ratelimit_headers
from gateway.render import Renderer
from gateway.router import Generated

_ZERO_SUFFIX = re.compile(r"bytes=-0+", re.ASCII | re.IGNORECASE)


def end_user_hash(key: bytes, member: str, user: str | None) -> str | None:
    """What upstream sees for ``user``: correlatable, but no member identity in it."""
    if user is None:
        return None
    mac = hmac.new(key, f"{member}\0{user}".encode(), hashlib.sha256).hexdigest()
    return "vgu-" + mac[:32]


def seed_for(pixels_sha256: str, offset: int, chosen: int | None = None) -> int:
    """Pool position ``offset`` of an image always gets the same seed; -1 means fresh.
    A client's ``chosen`` seed is position 0 of that seed's own pool (image i is
    seed + i), and fresh images for it (no-cache, no-store) are positions 0.. again."""
    if chosen is not None:
        return chosen + max(offset, 0)
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
    """``POST /v1/images/variations``, in the order a request lives (see the module)."""
    app = request.app
    live, quota = snapshot(request), app[QUOTA]  # the config and router, reload or not
    config = live.config
    record = request[AUDIT_RECORD]
    # Authenticate first: a stranger's body is never read.
    principal = app[AUTH].member(request)
    record.member = principal.name
    base = base_url(request, config.server)

    # Admit before the body is read (blocked users, the minute window, the in-flight
    # limit): a member at their limit gets 429 with their upload still unread, so
    # 600 held-open uploads from one member hold 2 bodies, not 600.
    async with quota.admit(principal):
        form, upload_sha256 = await _read_form(request)
        policy = policy_from_header(request.headers.get("Cache-Control"))
        cached = app[CACHE].enabled and policy != "no-store"
        source = await _look_at(app[PIXEL_HASHES], form.image, upload_sha256, cached)
        key = cache_key(source.pixels_sha256, form.size, form.model,
                        live.router.identity(form.model), _controls_key(form)
                        ) if cached else ""
        # Held at the dearest backend the request may reach; charged at the price of the
        # backend that generated (or its reported token usage).
        price = config.price_ceiling(form.model, form.size_label)
        charge = Charge(quota, principal, price, form.size_label)
        generate = _Generate(request, form, source, charge,
                             end_user_hash(app[USER_KEY], principal.name, form.user))
        record.end_user_hash = generate.end_user
        # Look up the cache, generating only what is missing; store (and sign) what we
        # answer, inside the block (the files stay until it exits).
        try:
            async with charge, app[CACHE].serve(
                    key, form.n, policy, generate, partial(_add_backend_time, request),
                    seeded=form.seed is not None) as result:
                data = await _render(app[RENDERER], result.items, form.response_format, base)
        finally:  # what the ledger holds, whatever happened: the audit says the same
            record.images_charged, record.cost_usd = charge.images, charge.cost
        counting = quota.count_request(principal, cache_hit=result.generated == 0)
        statuses = await _usage(request, principal, counting)

    record.cache = result.status
    _count(app[METRICS], principal.name, form, result, charge.cost, price, statuses)
    # The request's ledger row before its audit row (the middleware writes that one), so
    # the audit says what the client got.
    await counted(counting, app[WRITES], record.request_id)
    headers = {"X-Cache": result.status, **ratelimit_headers(statuses)}
    body = b"".join([b'{"created":%d,"data":' % int(time.time()), *data, b"}"])
    return web.Response(body=body, content_type="application/json", headers=headers)


async def _read_form(request: web.Request) -> tuple[upload.VariationForm, str]:
    """The validated form and its upload's SHA-256.

    The raw fields are audited even if they are refused, and a refused upload is named
    by its hash too. The body is read within the gateway-wide budget of bodies held at
    once, given back once the parts are split out.
    """
    app, record, live = request.app, request[AUDIT_RECORD], snapshot(request)
    async with app[UPLOAD_BUDGET].hold(upload.UploadBudget.bytes_for(request)):
        image, fields = await upload.read_fields(request,
                                                 live.config.server.read_timeout_seconds)
    record.end_user = upload.for_audit(fields.get("user"))
    record.size, record.model = upload.for_audit(fields.get("size")), upload.for_audit(
        fields.get("model"))
    upload_sha256 = "" if image is None else hashlib.sha256(image).hexdigest()
    if image is not None:
        record.image_sha256, record.upload_bytes = upload_sha256, len(image)
    form = upload.validate(image, fields, live.router.models,  # refuses a missing image
                           strict=live.config.api.strict_contract)
    record.n, record.size, record.model = form.n, form.size_label, form.model
    record.end_user = form.user
    record.strength, record.seed, record.prompt = form.strength, form.seed, form.prompt
    _check_controls(live.router.controls(form.model), form)
    app[METRICS].upload_bytes.observe(len(form.image))
    for control in form.controls_used():
        app[METRICS].variation_controls.labels(control).inc()
    return form, upload_sha256


def _check_controls(honoured: Controls, form: upload.VariationForm) -> None:
    """A control the model's route cannot honour is refused, never silently ignored."""
    for name in form.controls_used():
        if not honoured.honours(name):
            raise ApiError(
                400, f"Unsupported parameter: '{name}' is not supported with the model "
                f"'{form.model}' on this gateway (GET /v1/models lists its controls).",
                code="unsupported_parameter", param=name, should_retry=False)


def _controls_key(form: upload.VariationForm) -> str:
    """The controls' part of the cache key: "" when none is set (the key of a plain
    OpenAI request is unchanged), else strength, hint and the seed its pool starts at."""
    if not form.controls_used():
        return ""
    strength = "" if form.strength is None else f"{form.strength!r}"
    seed = "" if form.seed is None else str(form.seed)
    return f"strength={strength}\nseed={seed}\nprompt={form.prompt or ''}"


@dataclass(frozen=True)
class _Source:
    """The request's upload as the cache and the backends need it."""

    data: bytes
    sha256: str
    info: png.PngInfo
    pixels_sha256: str  # "" when the cache is bypassed: no decode, no key
    decoded: png.DecodedImage | None  # decoded by this request (for the key)
    checked: bool  # its pixel data is known to decode (the memo says so, or decoded)

    def make(self) -> SourceImage:
        """What backends receive (CPU-bound: an executor); a corrupt upload is a 400."""
        if self.decoded is not None:
            return self.decoded.to_source()
        return png.source_without_hash(self.data, self.info, self.sha256, self.checked)


async def _look_at(hashes: png.PixelHashes, data: bytes, upload_sha256: str,
                   cached: bool) -> _Source:
    """Inspect the upload's container (no pixels decoded yet) and, for the cache key,
    hash its pixels (decoded off the loop). A re-sent upload (the usual cache hit) was
    inspected and decoded before: the memo answers both. A request that bypasses the
    cache skips the decode; its pixel data is still checked once, when the backend's
    input is made: a corrupt upload is a 400, never sent on."""
    known = hashes.get(upload_sha256)
    info = known.info if known is not None else png.inspect(data)
    if not cached:
        return _Source(data, upload_sha256, info, "", None, known is not None)
    if known is not None and known.pixels_sha256 is not None:
        return _Source(data, upload_sha256, info, known.pixels_sha256, None, True)
    decoded = await asyncio.get_running_loop().run_in_executor(
        None, png.decode, data, info, upload_sha256)
    hashes.put(upload_sha256, png.Known(info, decoded.pixels_sha256))
    return _Source(data, upload_sha256, info, decoded.pixels_sha256, decoded, True)


@dataclass(frozen=True)
class _Generate:
    """The request's ``generate`` (:data:`gateway.cache.Generate`): the cache calls it,
    at most once, with the number of images missing and their pool position."""

    request: web.Request
    form: upload.VariationForm
    source: _Source
    charge: Charge
    end_user: str | None  # what upstream sees for the form's ``user``

    async def __call__(self, count: int, offset: int) -> Fresh:
        app, form = self.request.app, self.form
        record = self.request[AUDIT_RECORD]
        await self.charge.reserve(count)
        image = await asyncio.get_running_loop().run_in_executor(None, self.source.make)
        app[PIXEL_HASHES].put(self.source.sha256, png.Known(self.source.info))  # checked
        seed = seed_for(self.source.pixels_sha256, offset, form.seed)
        job = VariationRequest(image, count, form.size, self.end_user, record.request_id,
                               seed, form.strength, form.prompt, form.seed is not None)
        # A client that leaves now cancels this: the backend stops what it can
        # (procedural workers, ComfyUI prompts) and the charge's hold is refunded.
        result = await _call_backend(self.request, form.model, job)
        # Delivered: from here nothing awaits until the cache has begun the charge (it
        # charges these images, then pools them, in a task of its own, client or not).
        record.backend = result.backend
        if result.usage is not None:
            record.usage_input_tokens = (result.usage.text_input_tokens
                                         + result.usage.image_input_tokens)
            record.usage_output_tokens = result.usage.output_tokens
        live = snapshot(self.request)
        cost = live.config.backend(result.backend).cost(form.size_label, count, result.usage)
        app[METRICS].images_generated.labels(result.backend, form.size_label).inc(count)
        # A fallback's images answer now but are not what the key names: not pooled.
        return Fresh(result.images, keep=live.router.is_first(form.model, result.backend),
                     charge=self.charge.delivered(count, cost))


async def _call_backend(request: web.Request, model: str, job: VariationRequest
                        ) -> Generated:
    """The router's call; its time (failed attempts and fallbacks included) is backend
    time, but turning answers into PNGs is the gateway's (request_overhead_seconds)."""
    started = time.perf_counter()
    normalising = NormaliseClock()
    try:
        with normalise_clock() as normalising:
            return await snapshot(request).router.generate(model, job)
    finally:
        _add_backend_time(request, max(
            0.0, time.perf_counter() - started - normalising.seconds))


async def _render(renderer: Renderer, items: list[Item], response_format: str, base: str
                  ) -> list[bytes]:
    """The ``data`` array, as parts: from the memos on the loop, else off it."""
    data = renderer.from_memory(items, response_format, base)
    if data is None:
        data = await asyncio.get_running_loop().run_in_executor(
            None, renderer.render, items, response_format, base)
    return data


async def _usage(request: web.Request, principal: Principal, counting: Awaitable[None]
                 ) -> list[LimitStatus]:
    """The member's limits for the answer's headers. Should reading them fail, the
    answer is that error, but the request's ledger row is still waited for (and a
    failed one reported to ``/readyz``), as for any answer."""
    app = request.app
    try:
        return await app[QUOTA].usage(principal)
    except Exception:
        with contextlib.suppress(ApiError):
            await counted(counting, app[WRITES], request[AUDIT_RECORD].request_id)
        raise


def _count(metrics: Metrics, member: str, form: upload.VariationForm, result: CacheResult,
           cost: float, price: float, statuses: list[LimitStatus]) -> None:
    """The request's metrics: cache result, images and spend, the member's budget."""
    user_label = metrics.user_label(member)
    metrics.cache_lookups.labels(result.status.lower()).inc()
    served_from_cache = form.n - result.generated if result.status != "BYPASS" else 0
    if served_from_cache:
        metrics.images_from_cache.labels(form.size_label).inc(served_from_cache)
        metrics.cache_saved_usd.inc(price * served_from_cache)
    if result.generated:
        metrics.images_by_user.labels(user_label).inc(result.generated)
        metrics.spend_usd.labels(user_label).inc(cost)
    metrics.user_budget_ratio.labels(user_label).set(budget_used(statuses))


def _add_backend_time(request: web.Request, seconds: float) -> None:
    """Time spent on backends, or waiting for an identical request's call, is not the
    gateway's overhead."""
    request[BACKEND_SECONDS] += seconds


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
