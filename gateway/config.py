"""Configuration: YAML in, frozen dataclasses out.

The YAML is composed into nodes first so every error can name the key's path *and* its
line; ``${ENV}`` and ``${ENV:-default}`` are substituted in scalars before typing, so
``port: ${PORT:-8080}`` is still an int. Unknown keys are errors: a typo in a quota must
not silently mean "unlimited".
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import types
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gateway import backends
from gateway.generation import TokenUsage
from gateway.proxies import parse_networks
from gateway.tls import TLSFileError, server_context

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
    path: str = "var/audit.sqlite3"
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


# --------------------------------------------------------------------------- loading


_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _interpolate(value: str, env: Mapping[str, str], path: str, line: int | None) -> str:
    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env and (env[name] != "" or default is None):
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"environment variable {name} is not set", path, line)

    return _ENV_RE.sub(sub, value)


class _Loader(yaml.SafeLoader):
    """SafeLoader; interpolation happens on nodes before construction."""


def _walk_nodes(
    node: yaml.Node, path: str, lines: dict[str, int], env: Mapping[str, str], loader: _Loader
) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = str(key_node.value)
            sub = f"{path}.{key}" if path else key
            _walk_nodes(value_node, sub, lines, env, loader)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk_nodes(item, f"{path}[{i}]", lines, env, loader)
    elif isinstance(node, yaml.ScalarNode) and "${" in str(node.value):
        node.value = _interpolate(node.value, env, path, lines[path])
        if node.style is None:  # plain scalar: re-resolve so "8080" becomes an int
            node.tag = loader.resolve(yaml.ScalarNode, node.value, (True, False))


def _load_yaml(text: str, env: Mapping[str, str]) -> tuple[Any, dict[str, int]]:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}, {}
        lines: dict[str, int] = {}
        _walk_nodes(node, "", lines, env, loader)
        return loader.construct_document(node), lines
    except yaml.MarkedYAMLError as exc:
        raise _yaml_error(exc) from None
    finally:
        loader.dispose()


def _yaml_error(exc: yaml.MarkedYAMLError) -> ConfigError:
    """The line an admin has to edit, for a YAML syntax error.

    PyYAML's ``problem_mark`` is where it gave up, which for an unfinished token (a key
    without its ``:``, an unclosed quote or bracket) is the start of the *next* line or
    the end of the file: one line late. Its ``context_mark`` is where that token began:
    the line to fix. Block-structure errors keep the problem mark: their context is the
    whole enclosing block, often line 1.
    """
    problem, context = exc.problem_mark, exc.context_mark
    line = problem.line + 1 if problem is not None else None
    message = f"invalid YAML: {exc.problem}"
    unfinished = isinstance(exc, yaml.scanner.ScannerError) or "flow" in str(exc.context)
    if context is not None and unfinished and (line is None or context.line + 1 < line):
        message += f" ({exc.context} that starts on this line; noticed on line {line})"
        line = context.line + 1
    return ConfigError(message, "", line)


class _Builder:
    """Types a plain YAML value into (frozen) dataclasses, with path-and-line errors."""

    def __init__(self, lines: Mapping[str, int]) -> None:
        self.lines = lines

    def error(self, message: str, path: str) -> ConfigError:
        line = self.lines.get(path)
        probe = path
        while line is None and probe:
            probe = probe.rsplit(".", 1)[0] if "." in probe else ""
            line = self.lines.get(probe)
        return ConfigError(message, path, line)

    def dataclass(self, cls: type, raw: Any, path: str, skip: frozenset[str] = frozenset()
                  ) -> dict[str, Any]:
        """Field values for ``cls`` from ``raw`` (only keys present in ``raw``)."""
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise self.error(f"expected a mapping, got {type(raw).__name__}", path)
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)} - skip
        out: dict[str, Any] = {}
        for key, value in raw.items():
            sub = f"{path}.{key}" if path else str(key)
            if key not in names:
                known = ", ".join(sorted(names))
                raise self.error(f"unknown key (known keys: {known})", sub)
            out[key] = self.value(hints[key], value, sub)
        return out

    def make(self, cls: type, raw: Any, path: str) -> Any:
        try:
            return cls(**self.dataclass(cls, raw, path))
        except TypeError as exc:  # a required field missing
            raise self.error(str(exc).split(".__init__() ")[-1], path) from None
        except ConfigError:  # a nested key's error already names its line and path
            raise
        except ValueError as exc:  # a dataclass's own range checks (__post_init__)
            raise self.error(str(exc), path) from None

    def value(self, tp: Any, raw: Any, path: str) -> Any:
        if tp is Any:  # free-form (a backend's extra pipeline arguments)
            return raw
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):
            if raw is None and type(None) in args:
                return None
            inner = [a for a in args if a is not type(None)]
            return self.value(inner[0], raw, path)
        if origin is Literal:
            if raw not in args:
                allowed = ", ".join(repr(a) for a in args)
                raise self.error(f"must be one of {allowed}, got {raw!r}", path)
            return raw
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self.make(tp, raw, path)
        if tp is bool:
            if not isinstance(raw, bool):
                raise self.error(f"expected true or false, got {raw!r}", path)
            return raw
        if tp is int:
            if isinstance(raw, bool) or not isinstance(raw, int):
                raise self.error(f"expected an integer, got {raw!r}", path)
            if raw < 0:
                raise self.error(f"must not be negative, got {raw}", path)
            return raw
        if tp is float:
            if isinstance(raw, bool) or not isinstance(raw, int | float):
                raise self.error(f"expected a number, got {raw!r}", path)
            if raw < 0:
                raise self.error(f"must not be negative, got {raw}", path)
            return float(raw)
        if tp is str:
            if isinstance(raw, bool) or raw is None or isinstance(raw, list | dict):
                raise self.error(f"expected a string, got {raw!r}", path)
            return str(raw)
        if origin is tuple:
            if not isinstance(raw, list):
                raise self.error(f"expected a list, got {type(raw).__name__}", path)
            return tuple(self.value(args[0], v, f"{path}[{i}]") for i, v in enumerate(raw))
        if origin in (Mapping, dict):
            if not isinstance(raw, Mapping):
                raise self.error(f"expected a mapping, got {type(raw).__name__}", path)
            return {str(k): self.value(args[1], v, f"{path}.{k}") for k, v in raw.items()}
        raise self.error(f"unsupported type {tp!r}", path)  # pragma: no cover


# Backend options sent in HTTP headers (as is, or base64'd for basic auth).
_HEADER_KEYS = frozenset({"api_key", "organization", "project", "username", "password"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _header_value(b: _Builder, value: Any, path: str) -> Any:
    """``value`` without surrounding whitespace, when it is a string.

    Secrets often come from a file or an env var with a trailing newline, which makes
    every upstream request fail on an invalid header while /readyz says ready. A control
    character inside is refused here; the message never repeats the value (a key).
    """
    if not isinstance(value, str):
        return value
    value = value.strip()
    if _CONTROL.search(value):
        raise b.error("contains a control character (a line break or tab inside the "
                      "value?); the value is not shown", path)
    return value


def _check_sha(b: _Builder, value: str | None, path: str) -> None:
    if value is not None and not _HEX64.match(value):
        raise b.error("must be 64 lowercase hex characters (a SHA-256 of the token)", path)


def _check_members(b: _Builder, cfg: Config) -> None:
    """Refuse member settings that would silently not mean what they say.

    With ``auth.mode: none`` every request is anonymous: members pasted under ``users:``
    (as ``add-user`` prints them) would be ignored and any token, even a wrong one,
    accepted. Two members sharing a token hash could not be told apart (the first would
    be charged for both), and a member token equal to the admin's opens the admin API.
    """
    if cfg.auth.mode == "none" and cfg.users:
        raise b.error(
            f"auth.mode is none, so the {len(cfg.users)} member(s) under users: would be "
            "ignored and any token, even a wrong one, accepted. Set auth.mode: tokens to "
            "use them (or remove users: for an open loopback-only gateway)", "auth.mode")
    owners: dict[str, str] = {}
    for u in cfg.users.values():
        if u.token_sha256 is None:
            continue
        path = f"users.{u.name}.token_sha256"
        if u.token_sha256 in owners:
            raise b.error(f"the same token hash as users.{owners[u.token_sha256]}: each "
                          "member needs a token of its own (variations-gateway add-user "
                          f"{u.name})", path)
        if u.token_sha256 == cfg.auth.admin_token_sha256:
            raise b.error("the admin token's hash (auth.admin_token_sha256): a member's "
                          "token would open the admin API. Give the member a token of its "
                          f"own (variations-gateway add-user {u.name})", path)
        owners[u.token_sha256] = u.name


def build_config(raw: Any, lines: Mapping[str, int] | None = None) -> Config:
    """Validate a plain mapping (parsed YAML) into a :class:`Config`."""
    b = _Builder(lines or {})
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise b.error("the top level must be a mapping", "")
    raw = dict(raw)
    if "pricing" in raw:
        raise b.error("prices are set per backend now: move this table under the "
                      "backends that generate (backends[].pricing)", "pricing")
    special = {"users", "quota_defaults", "backends", "route"}
    kwargs = b.dataclass(Config, {k: v for k, v in raw.items() if k not in special}, "",
                         skip=frozenset())

    qd_raw = raw.get("quota_defaults") or {}
    defaults = b.make(QuotaLimits, qd_raw, "quota_defaults")
    kwargs["quota_defaults"] = defaults

    users: dict[str, UserConfig] = {}
    users_raw = raw.get("users") or {}
    if not isinstance(users_raw, Mapping):
        raise b.error("expected a mapping of user name to settings", "users")
    for name, u in users_raw.items():
        path = f"users.{name}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}", str(name)):
            raise b.error("user names use letters, digits, '_', '.', '@', '-'", path)
        u = u or {}
        if not isinstance(u, Mapping):
            raise b.error("expected a mapping", path)
        for key in u:
            if key not in ("token_sha256", "quota"):
                raise b.error("unknown key (known keys: quota, token_sha256)", f"{path}.{key}")
        token = u.get("token_sha256")
        if token is not None:
            token = b.value(str, token, f"{path}.token_sha256").lower()
            _check_sha(b, token, f"{path}.token_sha256")
        override = b.dataclass(QuotaLimits, u.get("quota"), f"{path}.quota")
        users[str(name)] = UserConfig(str(name), token, dataclasses.replace(defaults, **override))
    kwargs["users"] = users

    backend_list = []
    seen: set[str] = set()
    for i, entry in enumerate(raw.get("backends") or []):
        path = f"backends[{i}]"
        if not isinstance(entry, Mapping):
            raise b.error("expected a mapping with name and kind", path)
        name, kind = entry.get("name"), entry.get("kind")
        if not name or not isinstance(name, str):
            raise b.error("every backend needs a name", path)
        if name in seen:
            raise b.error(f"duplicate backend name {name!r}", f"{path}.name")
        seen.add(name)
        if kind not in backends.KINDS:
            raise b.error(f"unknown kind {kind!r} (kinds: {', '.join(backends.KINDS)})",
                          f"{path}.kind")
        common = {k: v for k, v in entry.items() if k in _BACKEND_COMMON}
        specific = {k: _header_value(b, v, f"{path}.{k}") if k in _HEADER_KEYS else v
                    for k, v in entry.items() if k not in _BACKEND_COMMON}
        common_kwargs = b.dataclass(BackendConfig, common, path, skip=frozenset({"options"}))
        options = b.make(backends.options_class(str(kind)), specific, path)
        pricing = options.default_pricing()
        for key, price in common_kwargs.get("pricing", {}).items():
            if key not in pricing:
                raise b.error(f"unknown price key {key!r} for kind {kind} (keys: "
                              f"{', '.join(pricing)})", f"{path}.pricing.{key}")
            pricing[key] = price
        common_kwargs["pricing"] = pricing
        backend_list.append(BackendConfig(options=options, **common_kwargs))
    if not backend_list:
        options = backends.options_class("procedural")()
        backend_list.append(BackendConfig(name="local", kind="procedural", options=options,
                                          pricing=options.default_pricing()))
    kwargs["backends"] = tuple(backend_list)

    route = b.value(tuple[str, ...], raw.get("route") or [], "route")
    names = [x.name for x in backend_list]
    for i, r in enumerate(route):
        if r not in names:
            raise b.error(f"no backend named {r!r} (backends: {', '.join(names)})",
                          f"route[{i}]")
    kwargs["route"] = route or (names[0],)

    cfg = Config(**kwargs)
    _check_sha(b, cfg.auth.admin_token_sha256, "auth.admin_token_sha256")
    _check_sha(b, cfg.metrics.token_sha256, "metrics.token_sha256")
    if cfg.auth.mode == "tokens":
        for u in cfg.users.values():
            if u.token_sha256 is None:
                raise b.error("auth.mode is tokens: every user needs token_sha256",
                              f"users.{u.name}")
    _check_members(b, cfg)
    if cfg.state.kind == "redis" and not cfg.state.redis_url:
        raise b.error("state.kind redis needs state.redis_url", "state.redis_url")
    if cfg.images.store == "redis" and cfg.state.kind != "redis":
        raise b.error("images.store redis needs state.kind redis", "images.store")
    if cfg.server.public_base_url and not re.match(r"^https?://", cfg.server.public_base_url):
        raise b.error("must start with http:// or https://", "server.public_base_url")
    _check_tls(b, cfg.server)
    problem = exposure_problem(cfg, cfg.server.host, is_loopback(cfg.server.host))
    if problem is not None:
        raise b.error(problem[1], problem[0])
    return cfg


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (no DNS: ``serve`` resolves other names)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_problem(cfg: Config, host: str, loopback: bool) -> tuple[str, str] | None:
    """``(key, sentence)`` when a gateway listening on ``host`` beyond loopback would
    hand things out to whoever can reach it, else ``None``.

    Without ``public_base_url`` image URLs are minted from the client's ``Host`` header
    (``Host: evil.example`` got links to evil.example); ``/metrics`` on the API port
    shows member names and spend. Both are fine on loopback, where only this machine
    reaches the gateway, and refused beyond it unless the admin chose how.
    """
    if loopback:
        return None
    if not cfg.server.public_base_url and not cfg.server.allowed_hosts:
        return ("server.public_base_url",
                f"the server would listen on {host}, beyond loopback, and image URLs would "
                "be built from whatever Host header a client sends: set "
                "server.public_base_url to the address clients use (e.g. "
                "https://variations.example.com), or list the host names clients may use "
                "in server.allowed_hosts")
    if cfg.metrics.enabled and cfg.metrics.port is None and cfg.metrics.token_sha256 is None:
        return ("metrics.token_sha256",
                f"the server would listen on {host}, beyond loopback, and /metrics on the "
                "API port shows member names and spend to anyone who reaches it: set "
                "metrics.token_sha256 (Prometheus then sends that bearer token), or "
                "metrics.port (served only there: keep that port on an internal network), "
                "or metrics.enabled: false")
    return None


def _check_tls(b: _Builder, server: ServerConfig) -> None:
    """Both TLS files or neither, and loadable now: a typo must not surface only when
    ``serve`` starts (or, worse, leave the gateway on plain http)."""
    if bool(server.tls_cert) != bool(server.tls_key):
        missing = "server.tls_key" if server.tls_cert else "server.tls_cert"
        raise b.error("set both server.tls_cert and server.tls_key (PEM files) to serve "
                      "https, or neither", missing)
    if server.tls_cert and server.tls_key:
        try:
            server_context(server.tls_cert, server.tls_key)
        except TLSFileError as exc:
            raise b.error(str(exc), exc.setting) from None


def parse_config(text: str, env: Mapping[str, str] | None = None) -> Config:
    raw, lines = _load_yaml(text, os.environ if env is None else env)
    return build_config(raw, lines)


def load_config(path: str | os.PathLike[str] | None,
                env: Mapping[str, str] | None = None) -> Config:
    """Load ``path``, else ``$VARIATIONS_GATEWAY_CONFIG``, else the built-in defaults."""
    env = os.environ if env is None else env
    chosen = path or env.get(DEFAULT_CONFIG_ENV) or None
    if chosen is None:
        return parse_config(DEFAULT_YAML, env)
    p = Path(chosen)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc.strerror}") from None
    return resolve_paths(parse_config(text, env), p.resolve().parent)


# Files and directories a config names, by section: relative ones are the config file's.
_PATH_FIELDS: dict[str, tuple[str, ...]] = {
    "server": ("tls_cert", "tls_key"),
    "state": ("path",),
    "cache": ("dir",),
    "images": ("dir",),
    "audit": ("path",),
}
_PATH_OPTIONS = ("workflow", "ca_file")  # backend options that name a file


def _resolved(value: Any, base: Path) -> Any:
    if not isinstance(value, str) or not value or value.startswith(":"):
        return value
    path = Path(value).expanduser()
    return value if path.is_absolute() else os.path.normpath(base / path)


def _resolve_fields(obj: Any, names: tuple[str, ...], base: Path) -> Any:
    present = {f.name for f in dataclasses.fields(obj)}
    changes = {n: _resolved(getattr(obj, n), base) for n in names if n in present}
    return dataclasses.replace(obj, **changes) if changes else obj


def resolve_paths(cfg: Config, base: Path) -> Config:
    """``cfg`` with its relative paths made absolute against ``base`` (the directory of
    the config file).

    Relative to the working directory, starting the same config from another directory
    silently started with empty quotas, cache and audit, and broke every issued URL.
    """
    sections = {name: _resolve_fields(getattr(cfg, name), fields, base)
                for name, fields in _PATH_FIELDS.items()}
    backend_list = tuple(
        dataclasses.replace(b, options=_resolve_fields(b.options, _PATH_OPTIONS, base))
        for b in cfg.backends)
    return dataclasses.replace(cfg, backends=backend_list, **sections)


# --------------------------------------------------------------------------- display

_SECRET_KEYS = {"signing_key", "api_key", "password", "basic_auth", "token"}


def _mask(key: str, value: Any) -> Any:
    if value in (None, ""):
        return value
    if key in _SECRET_KEYS:
        return "***"
    if key.endswith("_url") and isinstance(value, str):
        return _mask_url(value)
    return value


_SECRET_QUERY = re.compile(r"key|token|secret|pass|auth|sig", re.IGNORECASE)


def _mask_url(url: str) -> str:
    """The URL with its credentials masked: a password or a bare token in the userinfo
    (``https://tok@host``), and query values whose names say secret (``?api-key=``)."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if colon else f"***@{host}"
    query = "&".join(
        f"{name}={'***' if _SECRET_QUERY.search(name) else value}" if sep else name
        for name, sep, value in (item.partition("=") for item in parts.query.split("&"))
    ) if parts.query else ""
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def to_plain(obj: Any, key: str = "") -> Any:
    """A YAML-ready view of a config with secrets masked (for ``check-config``)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(obj, BackendConfig) and f.name == "options":
                out.update(to_plain(value))
                continue
            if isinstance(obj, UserConfig) and f.name == "name":
                continue
            out[f.name] = to_plain(value, f.name)
        return out
    if isinstance(obj, Mapping):
        return {k: to_plain(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return [to_plain(v, key) for v in obj]
    return _mask(key, obj)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_plain(cfg), sort_keys=False, default_flow_style=False)
