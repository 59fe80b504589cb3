"""The configuration's shape: frozen dataclasses with their own range checks.

Everything a running gateway reads of its config is here; how YAML becomes these objects
is :mod:`gateway.config.loader`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from gateway import backends
from gateway.generation import TokenUsage
from gateway.proxies import parse_networks

SIZES: tuple[str, ...] = ("256x256", "512x512", "1024x1024")
_HOST_ENTRY = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(:[0-9]{1,5})?", re.ASCII)
DEFAULT_CONFIG_ENV = "VARIATIONS_GATEWAY_CONFIG"


class ConfigError(ValueError):
    """A configuration problem, with the key path and, when known, the YAML line."""

    def __init__(self, message: str, path: str = "", line: int | None = None) -> None:
        where = path or "config"
        if line is not None:
            where = f"line {line}: {where}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    public_base_url: str | None = None
    shutdown_timeout_seconds: float = 30.0
    # Whole-request deadline for reading an upload; a slowloris client is cut off.
    read_timeout_seconds: float = 60.0
    # Proxies (addresses or networks) whose X-Forwarded-For names the client the audit
    # records; empty: the peer's own address.
    trusted_proxies: tuple[str, ...] = ()
    # PEM certificate chain and unencrypted key: both set, the gateway serves https
    # itself (read at start; a renewed certificate needs a restart).
    tls_cert: str | None = None
    tls_key: str | None = None
    # A connection that has not sent a whole request header by then is closed (a socket
    # that sends nothing, or a header byte at a time, would otherwise hold an fd forever).
    header_timeout_seconds: float = 15.0
    # An idle keep-alive connection between requests is closed after this.
    keepalive_timeout_seconds: float = 75.0
    # Request bodies read into memory at once, across all clients (declared length, or
    # the upload cap when unknown); past it a request waits up to upload_wait_seconds,
    # then gets 503 server_busy with retry-after.
    upload_budget_bytes: int = 64 * 1024**2
    upload_wait_seconds: float = 2.0
    # Host headers (name or name:port) a variation request may carry; image URLs are
    # minted from it when public_base_url is unset. Empty: any (loopback only).
    allowed_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        parse_networks(self.trusted_proxies)  # ValueError names the bad entry
        for name in ("header_timeout_seconds", "keepalive_timeout_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be more than 0")
        if self.upload_budget_bytes < 1:
            raise ValueError("upload_budget_bytes must be at least 1")
        if self.upload_wait_seconds < 0:
            raise ValueError("upload_wait_seconds must be 0 or more")
        for entry in self.allowed_hosts:
            if not _HOST_ENTRY.fullmatch(entry):
                raise ValueError(f"allowed_hosts: {entry!r} is not a host name or address, "
                                 "optionally with :port (e.g. variations.lan:8080)")
        # Host headers are compared case-insensitively (RFC 9110, 4.2.3).
        object.__setattr__(self, "allowed_hosts",
                           tuple(entry.lower() for entry in self.allowed_hosts))

    @property
    def tls(self) -> bool:
        """Whether the gateway speaks https itself (an empty ``${VAR:-}`` is unset)."""
        return bool(self.tls_cert and self.tls_key)

    def host_allowed(self, host: str) -> bool:
        """May a request carrying ``Host: host`` be answered (and URLs minted for it)?"""
        return not self.allowed_hosts or host.lower() in self.allowed_hosts


@dataclass(frozen=True)
class AuthConfig:
    mode: Literal["tokens", "none"] = "tokens"
    admin_token_sha256: str | None = None


@dataclass(frozen=True)
class QuotaLimits:
    """Per-user limits; ``None`` means unlimited."""

    images_per_day: int | None = 100
    images_per_month: int | None = None
    requests_per_minute: int | None = 20
    max_concurrent: int | None = 2
    budget_usd_per_month: float | None = None
    blocked: bool = False


# A member's name, wherever one is made (the config, the admin API, add-user): it is a
# metrics label and an audit value. "anonymous" is the caller when auth is off and
# "admin" names the admin token's actions in the audit trail.
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
RESERVED_USER_NAMES = frozenset({"anonymous", "admin"})


@dataclass(frozen=True)
class UserConfig:
    name: str
    token_sha256: str | None
    quota: QuotaLimits


@dataclass(frozen=True)
class StateConfig:
    kind: Literal["sqlite", "redis"] = "sqlite"
    path: str = "var/state.sqlite3"
    redis_url: str | None = None
    # How long a request waits on the state store before answering 503 state_unavailable.
    timeout_seconds: float = 2.0


@dataclass(frozen=True)
class CacheConfig:
    enabled: bool = True
    dir: str = "var/cache"
    max_bytes: int = 2 * 1024**3
    ttl_seconds: int = 30 * 24 * 3600
    # base64 of recently served cached images kept in memory (b64_json hits); 0: none
    memory_bytes: int = 32 * 1024**2

    def __post_init__(self) -> None:
        if self.memory_bytes < 0:
            raise ValueError("memory_bytes must be 0 or more")


@dataclass(frozen=True)
class ImagesConfig:
    dir: str = "var/images"
    url_ttl_seconds: int = 3600
    signing_key: str = ""
    store: Literal["fs", "redis"] = "fs"
    max_bytes: int | None = None
    sweep_interval_seconds: float = 60.0


@dataclass(frozen=True)
class RetryConfig:
    max_attempts: int = 3
    backoff_initial_seconds: float = 0.5
    backoff_max_seconds: float = 8.0
    retry_after_cap_seconds: float = 20.0


@dataclass(frozen=True)
class BreakerConfig:
    failure_threshold: int = 5
    cooldown_seconds: float = 30.0


@dataclass(frozen=True)
class TokenPrices:
    """USD per million tokens, as an upstream that bills per token lists them (gpt-image:
    text input, image input, image output)."""

    text_input: float = 0.0
    image_input: float = 0.0
    image_output: float = 0.0

    def cost(self, usage: TokenUsage) -> float:
        return (usage.text_input_tokens * self.text_input
                + usage.image_input_tokens * self.image_input
                + usage.output_tokens * self.image_output) / 1_000_000


@dataclass(frozen=True)
class BackendConfig:
    """One ``backends[]`` entry: common resilience settings plus kind-specific options.

    ``pricing`` is complete after loading: the kind's defaults (see
    ``BackendOptions.default_pricing``) with the admin's entries over them.
    """

    name: str
    kind: str
    options: backends.BackendOptions
    timeout_seconds: float = 120.0
    connect_timeout_seconds: float = 10.0
    max_concurrent: int | None = None
    queue_timeout_seconds: float = 30.0
    retry: RetryConfig = field(default_factory=RetryConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    pricing: Mapping[str, float] = field(default_factory=dict)
    token_prices: TokenPrices | None = None

    def image_price(self, size_label: str) -> float:
        """USD one image of ``size_label`` is estimated to cost on this backend."""
        return self.pricing.get(self.options.price_key(size_label), 0.0)

    def cost(self, size_label: str, images: int, usage: TokenUsage | None) -> float:
        """What ``images`` generated here cost: from the upstream's reported token usage
        when token prices are set, else the per-image estimate."""
        if usage is not None and self.token_prices is not None:
            return self.token_prices.cost(usage)
        return self.image_price(size_label) * images


_BACKEND_COMMON = {f.name for f in dataclasses.fields(BackendConfig)} - {"options"}


@dataclass(frozen=True)
class AuditConfig:
    """``kind: sqlite`` keeps the trail in ``path``; ``kind: postgres`` uses ``path`` as
    the outbox and ships every record to the PostgreSQL database of ``dsn``."""

    kind: Literal["sqlite", "postgres"] = "sqlite"
    path: str = "var/audit.sqlite3"
    dsn: str | None = field(default=None, repr=False)
    retention_days: int = 90
    stdout: bool = False


@dataclass(frozen=True)
class AbuseConfig:
    """When to raise ``abuse_suspected``: many end-user ids or repeated limit hits."""

    window_seconds: int = 600
    distinct_end_users: int = 20
    limit_hits: int = 10

    def __post_init__(self) -> None:
        # 0 would raise on every request here, and never in Redis (a 0 ms expiry).
        if self.window_seconds < 1 or self.distinct_end_users < 1 or self.limit_hits < 1:
            raise ValueError("window_seconds, distinct_end_users and limit_hits must be at "
                             "least 1")


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    port: int | None = None
    token_sha256: str | None = None


@dataclass(frozen=True)
class ApiConfig:
    """What the API accepts beyond OpenAI's contract. ``strict_contract``: refuse the
    variation controls (``strength``, ``seed``, ``prompt``) as unknown parameters, as
    OpenAI itself would, for clients that must not come to rely on them."""

    strict_contract: bool = False


@dataclass(frozen=True)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    users: Mapping[str, UserConfig] = field(default_factory=dict)
    quota_defaults: QuotaLimits = field(default_factory=QuotaLimits)
    state: StateConfig = field(default_factory=StateConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    backends: tuple[BackendConfig, ...] = ()
    route: tuple[str, ...] = ()
    audit: AuditConfig = field(default_factory=AuditConfig)
    abuse: AbuseConfig = field(default_factory=AbuseConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    api: ApiConfig = field(default_factory=ApiConfig)

    def backend(self, name: str) -> BackendConfig:
        for b in self.backends:
            if b.name == name:
                return b
        raise KeyError(name)

    def price_ceiling(self, model: str, size_label: str) -> float:
        """The most one image of ``size_label`` may cost for ``model`` (the route, or one
        backend by name): what a reservation holds before the backend that answers is
        known; the commit charges that backend's actual price."""
        names = self.route if model not in {b.name for b in self.backends} else (model,)
        return max((self.backend(n).image_price(size_label) for n in names), default=0.0)

    def quota_for(self, user: str) -> QuotaLimits:
        u = self.users.get(user)
        return u.quota if u else self.quota_defaults


# The built-in defaults: what `serve` runs with and no config file at all.
DEFAULT_YAML = """
server: {host: 127.0.0.1, port: 8080}
auth: {mode: none}
backends:
  - {name: local, kind: procedural}
route: [local]
"""
