"""A YAML-ready view of a config with its secrets masked (``check-config``)."""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

import yaml

from gateway.config import dsn
from gateway.config.model import BackendConfig, Config, UserConfig

_SECRET_KEYS = {"signing_key", "api_key", "password", "basic_auth", "token"}


def _mask(key: str, value: Any) -> Any:
    if value in (None, ""):
        return value
    if key in _SECRET_KEYS:
        return "***"
    if key.endswith("_url") and isinstance(value, str):
        return _mask_url(value)
    if key == "dsn" and isinstance(value, str):
        return dsn.mask(value)
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
