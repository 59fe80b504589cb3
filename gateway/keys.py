"""The typed keys under which the app keeps its parts (passed explicitly, no globals)."""

from __future__ import annotations

from aiohttp import web

from gateway.abuse import Abuse
from gateway.audit import AuditRecord, AuditTrail
from gateway.auth import Authenticator
from gateway.cache import ResultCache
from gateway.images import Images
from gateway.live import Live, Snapshot
from gateway.metrics import Metrics
from gateway.png import PixelHashes
from gateway.proxies import ClientAddress
from gateway.quota import QuotaStore
from gateway.render import Renderer
from gateway.upload import UploadBudget
from gateway.writes import WriteHealth

# The config and router, swapped whole by a reload: a request takes one snapshot.
LIVE = web.AppKey("live", Live)
AUTH = web.AppKey("auth", Authenticator)
IMAGES = web.AppKey("images", Images)
QUOTA = web.AppKey("quota", QuotaStore)
CACHE = web.AppKey("cache", ResultCache)
AUDIT: web.AppKey[AuditTrail] = web.AppKey("audit")
ABUSE = web.AppKey("abuse", Abuse)
METRICS = web.AppKey("metrics", Metrics)
PIXEL_HASHES = web.AppKey("pixel_hashes", PixelHashes)
RENDERER = web.AppKey("renderer", Renderer)
USER_KEY = web.AppKey("user_hash_key", bytes)
CLIENT_ADDRESS = web.AppKey("client_address", ClientAddress)
UPLOAD_BUDGET = web.AppKey("upload_budget", UploadBudget)

# Per request.
AUDIT_RECORD = web.RequestKey("audit_record", AuditRecord)
BACKEND_SECONDS = web.RequestKey("backend_seconds", float)
SNAPSHOT = web.RequestKey("snapshot", Snapshot)
# The outcome of the last ledger and audit writes, by store: /readyz shows failing ones.
WRITES = web.AppKey("writes", WriteHealth)


def audit_record(request: web.Request) -> AuditRecord:
    return request[AUDIT_RECORD]


def snapshot(request: web.Request) -> Snapshot:
    """The config and router ``request`` runs with: the snapshot it took at its start
    (:func:`gateway.app.finish_request`), else the current one (the metrics port's app
    has no middleware)."""
    held = request.get(SNAPSHOT)
    return held if held is not None else request.app[LIVE].current
