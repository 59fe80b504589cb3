"""The typed keys under which the app keeps its parts (passed explicitly, no globals)."""

from __future__ import annotations

from aiohttp import web

from gateway.abuse import Abuse
from gateway.audit import AuditRecord, AuditTrail
from gateway.auth import Authenticator
from gateway.cache import ResultCache
from gateway.config import Config
from gateway.images import Images
from gateway.metrics import Metrics
from gateway.png import PixelHashes
from gateway.proxies import ClientAddress
from gateway.quota import QuotaStore
from gateway.render import Renderer
from gateway.router import Router
from gateway.upload import UploadBudget
from gateway.writes import WriteHealth

CONFIG = web.AppKey("config", Config)
AUTH = web.AppKey("auth", Authenticator)
ROUTER = web.AppKey("router", Router)
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
# The outcome of the last ledger and audit writes, by store: /readyz shows failing ones.
WRITES = web.AppKey("writes", WriteHealth)


def audit_record(request: web.Request) -> AuditRecord:
    return request[AUDIT_RECORD]
