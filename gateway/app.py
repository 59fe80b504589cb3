"""Building the aiohttp application: parts, routes, the request middleware, lifecycle.

The middleware is where every request is finished the same way: a request id on every
response, errors rendered in the OpenAI envelope (never a bare 500 page), one log line,
one audit record for API routes, and the request metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import structlog
from aiohttp import web

from gateway import admin, admin_users, discovery, health, memory, variations
from gateway.abuse import Suspicion
from gateway.audit import AuditRecord
from gateway.auth import Authenticator
from gateway.charging import records_unavailable
from gateway.config import Config
from gateway.errors import ApiError, StorageUnavailable, storage_unavailable
from gateway.keys import (
    ABUSE,
    AUDIT,
    AUDIT_RECORD,
    AUTH,
    BACKEND_SECONDS,
    CACHE,
    CLIENT_ADDRESS,
    IMAGES,
    LIVE,
    METRICS,
    PIXEL_HASHES,
    QUOTA,
    RENDERER,
    SNAPSHOT,
    UPLOAD_BUDGET,
    USER_KEY,
    WRITES,
)
from gateway.live import Live, Snapshot
from gateway.members import Members
from gateway.metrics import Metrics
from gateway.png import PixelHashes
from gateway.proxies import ClientAddress
from gateway.quota import QuotaRejected, budget_used
from gateway.render import Renderer
from gateway.router import Router
from gateway.state import build_audit, build_state
from gateway.upload import UploadBudget
from gateway.writes import WriteHealth

log = structlog.get_logger("gateway.request")

AUDITED_PREFIXES = ("/v1/images/variations", "/v1/usage", "/admin/")
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _route_label(request: web.Request) -> str:
    route = request.match_info.route
    resource = route.resource
    return resource.canonical if resource is not None else "unmatched"


def _http_error(request: web.Request, exc: web.HTTPException) -> ApiError:
    if exc.status == 404:
        path = request.path[:100].encode("unicode_escape").decode("ascii")
        return ApiError(404, f"Invalid URL ({request.method} {path}).", code="not_found")
    if exc.status == 405:
        return ApiError(405, "Method not allowed on this route.", code="method_not_allowed")
    if exc.status == 413:
        return ApiError(413, "Request body too large.", code="request_too_large")
    return ApiError(exc.status, exc.reason or "HTTP error", code=None)


@web.middleware
async def finish_request(request: web.Request, handler: Handler) -> web.StreamResponse:
    app = request.app
    metrics = app[METRICS]
    request_id = "req_" + secrets.token_hex(12)
    started = time.perf_counter()
    record = AuditRecord(request_id, time.time(), request.path[:200],
                         client=app[CLIENT_ADDRESS].of(request))
    request[AUDIT_RECORD] = record
    request[BACKEND_SECONDS] = 0.0
    error: ApiError | None = None
    metrics.in_flight.inc()
    try:
        try:
            # One config for the whole request: a reload (SIGHUP) meanwhile is for the
            # requests after it, and waits for this one before closing what it retires.
            with app[LIVE].hold() as request[SNAPSHOT]:
                response = await handler(request)
        except ApiError as exc:
            error = exc
            if isinstance(exc, StorageUnavailable) and not exc.should_retry:
                log.error("storage_unavailable", request_id=request_id, path=request.path,
                          error=exc.kind, detail=str(exc.__cause__))
        except web.HTTPException as exc:
            error = _http_error(request, exc)
        except asyncio.CancelledError:
            record.status, record.error_code = 499, "client_closed_request"
            _finish(request, record, started, None, None)
            raise
        except Exception as exc:
            error = storage_unavailable(exc)
            if error is not None:
                log.error("storage_unavailable", request_id=request_id, path=request.path,
                          error=type(exc).__name__, detail=str(exc))
            else:
                log.exception("unhandled_error", request_id=request_id, path=request.path)
                error = ApiError(500, "The gateway hit an internal error; the request id "
                                 "names it in the gateway's logs.", code="internal_error",
                                 should_retry=True)
        if error is not None:
            response = error.response()
    finally:
        metrics.in_flight.dec()
    response.headers["x-request-id"] = request_id
    record.status = response.status
    if error is not None:
        record.error_code = error.code
    audited = _finish(request, record, started, error, response.content_length)
    if audited is not None:
        # Every answer waits for its audit row. On a failure (logged by _audit_done) a
        # variations success becomes a 503: no images go out that the audit does not hold.
        (outcome,) = await asyncio.shield(asyncio.gather(audited, return_exceptions=True))
        app[WRITES].report("audit", outcome if isinstance(outcome, BaseException) else None)
        if (isinstance(outcome, BaseException) and response.status < 400
                and request.path == "/v1/images/variations"):
            response = records_unavailable().response()
            response.headers["x-request-id"] = request_id
    return response


def _audit_done(metrics: Metrics, request_id: str, done: asyncio.Future[None]) -> None:
    if done.cancelled() or done.exception() is not None:
        metrics.audit_errors.inc()
        exc = None if done.cancelled() else done.exception()
        log.error("audit_write_failed", request_id=request_id,
                  error=type(exc).__name__ if exc else "CancelledError", detail=str(exc or ""))
    else:
        metrics.audit_events.inc()


def _abuse_suspected(metrics: Metrics, user_label: str, s: Suspicion) -> None:
    metrics.abuse_suspected.labels(s.reason, user_label).inc()
    log.warning("abuse_suspected", member=s.member, reason=s.reason, count=s.count,
                window_seconds=s.window_seconds)


def _finish(request: web.Request, record: AuditRecord, started: float,
            error: ApiError | None, bytes_out: int | None) -> asyncio.Future[None] | None:
    """Metrics, the audit record and the log line; returns the audit's commit (a
    response waits for it, so every answer a client saw is in the audit trail)."""
    app = request.app
    audited: asyncio.Future[None] | None = None
    metrics = app[METRICS]
    elapsed = time.perf_counter() - started
    record.latency_ms = round(elapsed * 1000, 3)
    route = _route_label(request)
    metrics.requests.labels(route, f"{record.status // 100}xx", record.error_code or "").inc()
    metrics.request_seconds.labels(route).observe(elapsed)
    metrics.overhead_seconds.labels(route).observe(max(0.0, elapsed - request[BACKEND_SECONDS]))
    user_label = metrics.user_label(record.member)
    if isinstance(error, QuotaRejected):
        metrics.quota_rejections.labels(error.limit, user_label).inc()
    if request.path.startswith(AUDITED_PREFIXES):
        if record.member is not None:
            metrics.user_requests.labels(user_label).inc()
        if record.member is None and record.status == 401:
            record.auth_error = "missing_token" if record.error_code is None else "bad_token"
        try:
            audited = app[AUDIT].write(record)
        except Exception:  # the audit must never take the request down with it
            metrics.audit_errors.inc()
            log.exception("audit_write_failed", request_id=record.request_id)
        else:
            audited.add_done_callback(partial(_audit_done, metrics, record.request_id))
        app[ABUSE].report(record.member, record.end_user, isinstance(error, QuotaRejected),
                          partial(_abuse_suspected, metrics, user_label))
    if request.path in QUIET_PATHS and record.status < 400:
        return audited
    # One line per request; for API routes it carries the audit record's fields too.
    log.info("request", request_id=record.request_id, method=request.method,
             path=record.route, status=record.status, member=record.member,
             auth_error=record.auth_error, user=record.end_user, client=record.client,
             image_sha256=record.image_sha256, model=record.model, latency_ms=record.latency_ms,
             backend=record.backend, cache=record.cache, n=record.n, size=record.size,
             images_charged=record.images_charged, error_code=record.error_code,
             bytes_in=record.upload_bytes, bytes_out=bytes_out)
    return audited


def user_hash_key(signing_key: bytes) -> bytes:
    """A key for end-user HMACs, derived so it differs from the URL-signing key."""
    return hmac.new(signing_key, b"end-user-hash", hashlib.sha256).digest()


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    config = app[LIVE].current.config
    # Decodes, hashing and file I/O run in the default executor. Sized to the cores: more
    # threads add no throughput to CPU-bound work, and each one gets its own glibc malloc
    # arena, which grew RSS by ~16% over 20,000 requests in make bench (6 threads).
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2),
                           thread_name_prefix="gateway"))
    try:
        await app[LIVE].current.router.start()
        await app[AUTH].start()  # config members seeded, API members read
    except BaseException:  # e.g. a SIGTERM during start-up: stop what did start
        await app[LIVE].close()
        raise
    members = app[AUTH].members
    tasks = [asyncio.create_task(app[IMAGES].sweeper(config.images.sweep_interval_seconds)),
             asyncio.create_task(_refresh_gauges(app)),
             asyncio.create_task(app[CACHE].sweeper()),
             asyncio.create_task(app[AUDIT].run()),
             asyncio.create_task(memory.trim_after_bursts())]
    if members is not None:  # other replicas' member changes
        tasks.append(asyncio.create_task(members.store.watch(app[AUTH].refresh)))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await app[LIVE].close()
        await app[CACHE].close()
        await app[QUOTA].close()
        await app[ABUSE].close()
        if members is not None:
            await members.store.close()
        await app[AUDIT].aclose()


async def _refresh_gauges(app: web.Application, interval: float = 5.0) -> None:
    """Keep the state-derived gauges current without reading the state on every scrape."""
    while True:
        try:
            await refresh_gauges(app)
        except Exception:  # a bug here must not end the refreshes for good
            log.exception("gauge_refresh_failed")
        await asyncio.sleep(interval)


async def refresh_gauges(app: web.Application) -> None:
    """Breaker states, cache size, free disk space, and each member's budget share from
    the quota store.

    A request only updates its own member on its own replica, and a breaker's cooldown
    ends with no request to see it: without this a new month (or usage through another
    replica) would leave the old share on the dashboard, and an open circuit would keep
    BackendDown firing through an idle night."""
    live = app[LIVE].current
    if not live.config.metrics.enabled:
        return
    metrics = app[METRICS]
    outbox = app[AUDIT].outbox_stats()
    metrics.set_outbox(outbox.records, outbox.oldest_ts, time.time())
    live.router.report_breakers()  # open -> half_open happens with no request to see it
    with contextlib.suppress(Exception):
        metrics.set_cache_stats(*await app[CACHE].stats())
    for store, directory in health.local_stores(live.config).items():
        ratio = health.free_ratio(directory)
        if ratio is not None:
            metrics.storage_free.labels(store).set(ratio)
    for principal in app[AUTH].principals():
        try:
            statuses = await app[QUOTA].usage(principal)
        except ApiError:
            # The state store is unavailable (and has said so): keep the last values and
            # end the round, rather than warn once per member.
            return
        metrics.user_budget_ratio.labels(metrics.user_label(principal.name)).set(
            budget_used(statuses))


def build_app(config: Config, sha256: str | None = None) -> web.Application:
    """The whole gateway for ``config`` (``sha256``: of its file, shown by /readyz);
    parts start and stop with the app."""
    app = web.Application(middlewares=[finish_request], client_max_size=5 * 1024 * 1024)
    state = build_state(config)
    app[AUTH] = Authenticator(config, Members(state.members))
    app[METRICS] = Metrics(config.users)
    app[AUTH].on_rebuild(lambda members: app[METRICS].set_members(p.name for p in members))
    app[LIVE] = Live(Snapshot(config, Router(config, app[METRICS]), time.time(), sha256))
    app[IMAGES] = state.images
    app[USER_KEY] = user_hash_key(state.signing_key)
    app[QUOTA] = state.quota
    app[CACHE] = state.cache
    app[AUDIT] = build_audit(config)
    app[ABUSE] = state.abuse
    app[PIXEL_HASHES] = PixelHashes()
    app[RENDERER] = Renderer(state.images, config.cache.memory_bytes)
    app[CLIENT_ADDRESS] = ClientAddress(config.server.trusted_proxies)
    app[WRITES] = WriteHealth()
    app[UPLOAD_BUDGET] = UploadBudget(config.server.upload_budget_bytes,
                                      config.server.upload_wait_seconds)
    app.cleanup_ctx.append(_lifecycle)

    app.router.add_post("/v1/images/variations", variations.create_variation)
    app.router.add_get(r"/v1/images/files/{image_id}.png", variations.get_image)
    app.router.add_get("/v1/models", discovery.list_models)
    app.router.add_get("/v1/models/{model}", discovery.get_model)
    app.router.add_get("/", discovery.index)
    app.router.add_get("/v1/usage", admin.usage)
    app.router.add_get("/admin/usage", admin.admin_usage)
    app.router.add_get("/admin/usage.csv", admin.usage_csv)
    app.router.add_get("/admin/audit", admin.admin_audit)
    admin_users.add_routes(app.router)
    app.router.add_post("/admin/users/{name}/block", admin.block)
    app.router.add_post("/admin/users/{name}/unblock", admin.unblock)
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get("/openapi.json", health.openapi)
    if config.metrics.enabled and config.metrics.port is None:
        app.router.add_get("/metrics", health.metrics)
    return app
