"""Member and admin authentication.

The config holds only SHA-256 digests of tokens. A presented token is hashed and
compared with every member's digest using :func:`hmac.compare_digest`, without an
early exit, so neither the token nor which member it nearly matched leaks through
timing. Error messages never echo any part of the presented token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from aiohttp import web

from gateway.config import Config, QuotaLimits
from gateway.errors import ApiError

ANONYMOUS = "anonymous"

MISSING_KEY = (
    "You didn't provide an API key. You need to provide your gateway member token in an "
    "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_TOKEN). "
    "Ask your gateway admin for a token (variations-gateway add-user NAME)."
)
WRONG_KEY = (
    "Incorrect API key provided. This gateway accepts member tokens issued by its admin "
    "(variations-gateway add-user NAME); check the token in your client settings."
)


@dataclass(frozen=True)
class Principal:
    """Who is calling: a configured member (or ``anonymous`` when auth is off)."""

    name: str
    quota: QuotaLimits
    configured: bool  # named in the config: safe to use as a metrics label


def token_sha256(token: str) -> str:
    # Header bytes that are not UTF-8 reach us as surrogates: hash them, don't crash.
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def new_token() -> str:
    """A strong member token: 256 bits, URL-safe, recognisable prefix."""
    return "vg-" + secrets.token_urlsafe(32)


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _matches(digest: str, expected: str) -> bool:
    return hmac.compare_digest(digest.encode("ascii"), expected.encode("ascii"))


@dataclass(frozen=True)
class _Table:
    """What the config says about callers; replaced whole, so a lookup never sees
    half of a reload."""

    mode: str
    members: tuple[tuple[str, Principal], ...]
    admin: str | None
    anonymous: Principal

    @classmethod
    def of(cls, config: Config) -> _Table:
        return cls(config.auth.mode,
                   tuple((u.token_sha256, Principal(u.name, u.quota, True))
                         for u in config.users.values() if u.token_sha256),
                   config.auth.admin_token_sha256,
                   Principal(ANONYMOUS, config.quota_defaults, False))


class Authenticator:
    """Maps a bearer token to a :class:`Principal`."""

    def __init__(self, config: Config) -> None:
        self._table = _Table.of(config)

    async def apply_config(self, config: Config) -> None:
        """Take the members, their quotas and the admin token from a reloaded config;
        a request already authenticated keeps the principal (and quota) it got."""
        self._table = _Table.of(config)

    @property
    def mode(self) -> str:
        return self._table.mode

    def principals(self) -> tuple[Principal, ...]:
        """Everyone who can call: the configured members, or ``anonymous`` alone."""
        table = self._table
        if table.mode == "none":
            return (table.anonymous,)
        return tuple(principal for _, principal in table.members)

    def member(self, request: web.Request) -> Principal:
        """The calling member; raises 401 in the OpenAI envelope."""
        table = self._table
        if table.mode == "none":
            return table.anonymous
        token = bearer_token(request)
        if token is None:
            raise ApiError(401, MISSING_KEY, code=None, should_retry=False)
        digest = token_sha256(token)
        found: Principal | None = None
        for expected, principal in table.members:
            if _matches(digest, expected) and found is None:
                found = principal
        if found is None:
            raise ApiError(401, WRONG_KEY, code="invalid_api_key", should_retry=False)
        return found

    def admin(self, request: web.Request) -> None:
        """Admin routes: 401 without a token, 403 for anything but the admin token."""
        token = bearer_token(request)
        if token is None:
            raise ApiError(401, MISSING_KEY, code=None, should_retry=False)
        admin = self._table.admin
        if admin is None or not _matches(token_sha256(token), admin):
            raise ApiError(403, "This route needs the gateway's admin token.",
                           code="admin_only", should_retry=False)
