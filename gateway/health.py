"""Health, readiness, the OpenAPI document and the metrics exposition."""

from __future__ import annotations

import hmac
import importlib.resources
import os
import time
from pathlib import Path

from aiohttp import web

from gateway.auth import bearer_token, token_sha256
from gateway.config import Config
from gateway.errors import ApiError
from gateway.keys import AUDIT, IMAGES, METRICS, QUOTA, WRITES, snapshot
from gateway.live import Snapshot


def local_stores(config: Config) -> dict[str, Path]:
    """The directories the gateway writes on this host, by store."""
    stores = {"cache": Path(config.cache.dir), "images": Path(config.images.dir),
              "audit": Path(config.audit.path).parent}
    if config.state.kind == "sqlite":
        stores["state"] = Path(config.state.path).parent
    return stores


def free_ratio(directory: Path) -> float | None:
    """The free share of the file system under ``directory`` (None if it cannot be read)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail / st.f_blocks if st.f_blocks else None


async def healthz(request: web.Request) -> web.Response:
    """The process is alive and its event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the state store answers, images can be written, a routed backend is up."""
    app = request.app
    checks: dict[str, object] = {}
    ok = True
    try:
        await app[QUOTA].is_blocked("_readyz")
        checks["state"] = "ok"
    except Exception as exc:  # any failure of the store means not ready
        checks["state"] = f"error: {type(exc).__name__}"
        ok = False
    images_dir = app[IMAGES].dir
    writable = os.access(images_dir, os.W_OK)
    checks["storage"] = "ok" if writable else f"not writable: {images_dir}"
    ok = ok and writable
    failing = app[WRITES].failing()
    checks["writes"] = {store: f"failing: {why}" for store, why in failing.items()} or "ok"
    ok = ok and not failing
    # Shown, never a reason to be unready: with kind postgres every answer is committed
    # to the local outbox first, and PostgreSQL away only delays the team's view.
    checks["audit"] = app[AUDIT].status()
    live = snapshot(request)
    states = await live.router.check()
    checks["backends"] = {s.name: {"kind": s.kind, "ready": s.ready, "detail": s.detail,
                                   **s.extra} for s in states}
    checks["config"] = config_detail(live)
    route = live.config.route
    if not any(s.ready for s in states if s.name in route):
        ok = False
    return web.json_response({"status": "ready" if ok else "not_ready", "checks": checks},
                             status=200 if ok else 503)


def config_detail(live: Snapshot) -> dict[str, object]:
    """Which config this replica runs: after a reload (SIGHUP) an operator compares the
    hash with the file's ``sha256sum`` and sees when it was loaded."""
    return {"loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(live.loaded_at)),
            "sha256": live.sha256, "reloads": live.generation}


async def openapi(request: web.Request) -> web.Response:
    text = importlib.resources.files("gateway").joinpath("openapi.json").read_text("utf-8")
    return web.Response(text=text, content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    expected = snapshot(request).config.metrics.token_sha256
    if expected is not None:
        token = bearer_token(request)
        if token is None or not hmac.compare_digest(token_sha256(token), expected):
            # Returned, not raised: on its own port this app has no error middleware.
            return ApiError(401, "The metrics endpoint needs its bearer token.",
                            code="invalid_api_key").response()
    return web.Response(body=request.app[METRICS].exposition(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
