"""From a file (or text, or a mapping) to a checked :class:`Config`: the rules that span
several keys, and relative paths made the config file's."""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway import backends
from gateway.config import dsn
from gateway.config.builder import _Builder
from gateway.config.model import (
    _BACKEND_COMMON,
    DEFAULT_CONFIG_ENV,
    DEFAULT_YAML,
    RESERVED_USER_NAMES,
    USER_NAME,
    BackendConfig,
    Config,
    ConfigError,
    QuotaLimits,
    ServerConfig,
    UserConfig,
)
from gateway.config.yamlfile import _load_yaml
from gateway.tls import TLSFileError, server_context

_HEX64 = re.compile(r"^[0-9a-f]{64}$")

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


def build_config(raw: Any, lines: Mapping[str, int] | None = None,
                 base: Path | None = None) -> Config:
    """Validate a plain mapping (parsed YAML) into a :class:`Config`.

    ``base``: the config file's directory; relative paths are made its own before the
    checks that open files (TLS) run.
    """
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
    defaults = b.make(QuotaLimits, raw.get("quota_defaults") or {}, "quota_defaults")
    kwargs["quota_defaults"] = defaults
    kwargs["users"] = _users(b, raw.get("users") or {}, defaults)
    kwargs["backends"] = _backends(b, raw.get("backends") or [])
    kwargs["route"] = _route(b, raw.get("route") or [], kwargs["backends"])
    cfg = Config(**kwargs)
    if base is not None:
        cfg = resolve_paths(cfg, base)
    _check(b, cfg)
    return cfg




_MEMBER_ENTRY = re.compile(r"([^=,\s]+)=([^=,\s]*)")


def _members_string(b: _Builder, text: str) -> dict[str, Any]:
    """``users: "alice=<sha256>, bob=<sha256>"``: members from one environment variable.

    A container is configured by ``-e`` more easily than by a mounted file; the string
    is ``name=token_sha256`` entries separated by commas or spaces (quotas: the
    defaults). Anything else is refused, the value unshown: it may hold a token.
    """
    entries = text.replace(",", " ").split()
    if not entries:  # "${MEMBERS:?...}" lets " , " through: a gateway nobody may use
        raise b.error("the string of users holds no entry (only spaces or commas): give "
                      "name=<token sha256> entries separated by commas", "users")
    out: dict[str, Any] = {}
    for i, entry in enumerate(entries):
        m = _MEMBER_ENTRY.fullmatch(entry)
        if m is None:
            raise b.error(f"entry {i + 1} is not name=<token sha256> (a string of users "
                          "is name=<64 hex> entries separated by commas; "
                          "variations-gateway add-user NAME prints both)", "users")
        name = m.group(1)
        if name.lower().startswith("vg-"):  # never echoed: it is probably a secret
            raise b.error(f"entry {i + 1}'s name looks like a token (it starts with "
                          "vg-): the name goes before '=', the token's sha256 after it, "
                          "never the token itself", "users")
        if name in out:  # the last one silently won, the first member's token stopped
            raise b.error(f"entry {i + 1} names {name!r} again: each member once",
                          "users")
        out[name] = {"token_sha256": m.group(2)}
    return out


def _users(b: _Builder, users_raw: Any, defaults: QuotaLimits) -> dict[str, UserConfig]:
    """``users:``: each member's token hash and quota, falling back key by key to
    ``quota_defaults``."""
    if isinstance(users_raw, str):
        users_raw = _members_string(b, users_raw)
    if not isinstance(users_raw, Mapping):
        raise b.error("expected a mapping of user name to settings", "users")
    users: dict[str, UserConfig] = {}
    for name, u in users_raw.items():
        path = f"users.{name}"
        if not USER_NAME.fullmatch(str(name)):
            raise b.error("user names use letters, digits, '_', '.', '@', '-'", path)
        if name in RESERVED_USER_NAMES:
            raise b.error(f"'{name}' is reserved (it names the gateway's own callers in "
                          "metrics and the audit trail): choose another name", path)
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
    return users


def _backends(b: _Builder, entries: Any) -> tuple[BackendConfig, ...]:
    """``backends:``; none configured means the embedded procedural one."""
    backend_list: list[BackendConfig] = []
    for i, entry in enumerate(entries):
        path = f"backends[{i}]"
        backend = _backend(b, entry, path)
        if backend.name in {x.name for x in backend_list}:
            raise b.error(f"duplicate backend name {backend.name!r}", f"{path}.name")
        backend_list.append(backend)
    if not backend_list:
        options = backends.options_class("procedural")()
        backend_list.append(BackendConfig(name="local", kind="procedural", options=options,
                                          pricing=options.default_pricing()))
    return tuple(backend_list)


def _backend(b: _Builder, entry: Any, path: str) -> BackendConfig:
    """One ``backends[]`` entry: the common settings, the kind's options, and its prices
    (the kind's defaults with the admin's entries over them)."""
    if not isinstance(entry, Mapping):
        raise b.error("expected a mapping with name and kind", path)
    name, kind = entry.get("name"), entry.get("kind")
    if not name or not isinstance(name, str):
        raise b.error("every backend needs a name", path)
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
    return BackendConfig(options=options, **common_kwargs)


def _route(b: _Builder, raw: Any, backend_list: tuple[BackendConfig, ...]
           ) -> tuple[str, ...]:
    route: tuple[str, ...] = b.value(tuple[str, ...], raw, "route")
    names = [x.name for x in backend_list]
    for i, r in enumerate(route):
        if r not in names:
            raise b.error(f"no backend named {r!r} (backends: {', '.join(names)})",
                          f"route[{i}]")
    return route or (names[0],)


def _check(b: _Builder, cfg: Config) -> None:
    """The rules that span sections; each refusal names the key to change."""
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
    if cfg.audit.kind == "postgres" and not cfg.audit.dsn:
        raise b.error("audit.kind postgres needs audit.dsn (postgresql://user@host/db; "
                      "the password from ${ENV})", "audit.dsn")
    if cfg.audit.kind == "postgres" and cfg.audit.dsn:
        why = dsn.problem(cfg.audit.dsn)
        if why is not None:
            raise b.error(why, "audit.dsn")
    if cfg.images.store == "redis" and cfg.state.kind != "redis":
        raise b.error("images.store redis needs state.kind redis", "images.store")
    if cfg.server.public_base_url and not re.match(r"^https?://", cfg.server.public_base_url):
        raise b.error("must start with http:// or https://", "server.public_base_url")
    _check_tls(b, cfg.server)
    _check_signing_key(b, cfg.images.signing_key)
    problem = exposure_problem(cfg, cfg.server.host, is_loopback(cfg.server.host))
    if problem is not None:
        raise b.error(problem[1], problem[0])


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


MIN_SIGNING_KEY = 32


def _check_signing_key(b: _Builder, key: str) -> None:
    """A configured key is used as its text (UTF-8 bytes, not decoded) to sign image
    URLs: a short or guessable one lets anyone forge them. Never shown."""
    if key and len(key) < MIN_SIGNING_KEY:
        raise b.error(f"is {len(key)} characters long; a signing key needs at least "
                      f"{MIN_SIGNING_KEY} random ones (anyone who guesses it can forge "
                      "image URLs): make one with `openssl rand -hex 32`, or leave it "
                      "empty to have one generated and kept with the state",
                      "images.signing_key")


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


def parse_config(text: str, env: Mapping[str, str] | None = None,
                 base: Path | None = None) -> Config:
    """``text`` as YAML; ``base``: the directory relative paths are taken from."""
    raw, lines = _load_yaml(text, os.environ if env is None else env)
    return build_config(raw, lines, base)


def load_config(path: str | os.PathLike[str] | None,
                env: Mapping[str, str] | None = None) -> Config:
    """Load ``path``, else ``$VARIATIONS_GATEWAY_CONFIG``, else the built-in defaults."""
    return read_config(path, env)[0]


def read_config(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None
                ) -> tuple[Config, str | None]:
    """The config :func:`load_config` reads and the SHA-256 of the file's bytes (None for
    the built-in defaults): ``serve`` and a reload show it in ``/readyz``."""
    env = os.environ if env is None else env
    chosen = path or env.get(DEFAULT_CONFIG_ENV) or None
    if chosen is None:
        return parse_config(DEFAULT_YAML, env), None
    p = Path(chosen)
    try:
        data = p.read_bytes()
        text = data.decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p} is not UTF-8 (byte {exc.start})") from None
    return parse_config(text, env, p.resolve().parent), hashlib.sha256(data).hexdigest()


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
