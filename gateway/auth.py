"""Member and admin authentication, from an in-memory table kept current.

The table maps token digests (SHA-256; no token is stored anywhere) to members: this
replica's config members and the member store's API members. A presented token is
hashed, looked up by its digest and confirmed with :func:`hmac.compare_digest`. Why a
lookup rather than comparing with every digest: with API members the table can hold
thousands of tokens, and the time a lookup takes depends only on the digest of what the
caller sent, from which nothing about a stored token can be learnt without a SHA-256
preimage. The table is rebuilt when the store announces a change (pub/sub on Redis, the
admin API itself on SQLite), never read from the store on the hot path.

Error messages never echo any part of the presented token, nor whose it was: a revoked
or expired token is told only that it was revoked or has expired.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from gateway.config import Config, QuotaLimits
from gateway.errors import ApiError
from gateway.members import Members, Snapshot, new_token, token_sha256

__all__ = ["ANONYMOUS", "Authenticator", "Principal", "admin_id", "bearer_token",
           "new_token", "token_sha256"]

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
REVOKED_KEY = (
    "Incorrect API key provided: this token was revoked by the gateway admin. Ask the "
    "admin for a new token and update your client settings."
)
EXPIRED_KEY = (
    "Incorrect API key provided: this token has expired. Ask the gateway admin for a new "
    "token and update your client settings."
)


@dataclass(frozen=True)
class Principal:
    """Who is calling: a member (or ``anonymous`` when auth is off)."""

    name: str
    quota: QuotaLimits
    configured: bool  # named in the config (not made through the admin API)


@dataclass(frozen=True)
class _Entry:
    digest: str
    principal: Principal
    expires_at: float | None  # the earlier of the token's and the member's expiry


def admin_id(digest: str) -> str:
    """A short, stable name for the admin token in the audit: derived from its digest
    (one more hash, so not even the digest's prefix is shown)."""
    return "admin:" + token_sha256("admin-id:" + digest)[:10]


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _matches(digest: str, expected: str) -> bool:
    return hmac.compare_digest(digest.encode("ascii"), expected.encode("ascii"))


def _min(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


class Authenticator:
    """Maps a bearer token to a :class:`Principal`. ``clock`` (unix seconds) is public
    so tests can move time past an expiry."""

    def __init__(self, config: Config, members: Members | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.members = members
        self.clock = clock
        self._snapshot = Snapshot({}, frozenset())
        # One store read applied at a time, in the order read: two overlapping reads (the
        # admin API's and the watcher's) must not leave the older one in place.
        self._reading = asyncio.Lock()
        self._listeners: list[Callable[[tuple[Principal, ...]], object]] = []
        self._configure(config)

    def on_rebuild(self, listener: Callable[[tuple[Principal, ...]], object]) -> None:
        """Call ``listener`` with the members whenever they change (metrics labels)."""
        self._listeners.append(listener)
        listener(self._principals)

    def _configure(self, config: Config) -> None:
        self._config = config
        self._mode = config.auth.mode
        self._admin = config.auth.admin_token_sha256
        self._anonymous = Principal(ANONYMOUS, config.quota_defaults, False)
        self._rebuild()

    def _rebuild(self) -> None:
        """The table from the config's members and the last snapshot's API members."""
        config, table = self._config, {}
        principals = []  # config members first, in config order, then the API's
        for u in config.users.values():
            principal = Principal(u.name, u.quota, True)
            principals.append(principal)
            if u.token_sha256:
                table[u.token_sha256] = _Entry(u.token_sha256, principal, None)
        for m in self._snapshot.members.values():
            if m.source != "api" or m.name in config.users:
                continue  # config members come from this replica's own config
            principal = Principal(m.name, m.limits(config.quota_defaults), False)
            principals.append(principal)
            for t in m.tokens:
                table[t.sha256] = _Entry(t.sha256, principal, _min(t.expires_at, m.expires_at))
        self._table = table
        self._principals = tuple(principals)
        for listener in self._listeners:
            listener(self._principals)

    async def start(self) -> None:
        """Seed the config's members into the store and read its members (at start)."""
        if self.members is not None:
            await self.members.seed(self._config)
            await self.refresh()

    async def apply_config(self, config: Config) -> None:
        """Take a reloaded config: its members, quotas and admin token (SIGHUP). The
        store is seeded and read first and the config taken only then, so a reload the
        store fails (a Redis blip, SQLite locked) leaves the running members and admin
        token in place, as the reload reports."""
        if self.members is not None:
            await self.members.seed(config)
            async with self._reading:
                self._snapshot = await self.members.store.load()
                self._configure(config)
        else:
            self._configure(config)

    async def refresh(self) -> None:
        """Re-read the member store: after a change here, or announced by another
        replica."""
        if self.members is not None:
            async with self._reading:
                self._snapshot = await self.members.store.load()
                self._rebuild()

    @property
    def mode(self) -> str:
        return self._mode

    def principals(self) -> tuple[Principal, ...]:
        """Everyone who can call: the members, or ``anonymous`` alone."""
        if self._mode == "none":
            return (self._anonymous,)
        return self._principals

    def member(self, request: web.Request) -> Principal:
        """The calling member; raises 401 in the OpenAI envelope."""
        if self._mode == "none":
            return self._anonymous
        token = bearer_token(request)
        if token is None:
            raise ApiError(401, MISSING_KEY, code=None, should_retry=False)
        digest = token_sha256(token)
        entry = self._table.get(digest)
        if entry is None or not _matches(digest, entry.digest):
            message = REVOKED_KEY if digest in self._snapshot.revoked else WRONG_KEY
            raise ApiError(401, message, code="invalid_api_key", should_retry=False)
        if entry.expires_at is not None and self.clock() >= entry.expires_at:
            raise ApiError(401, EXPIRED_KEY, code="invalid_api_key", should_retry=False)
        return entry.principal

    def admin(self, request: web.Request) -> str:
        """Admin routes: 401 without a token, 403 for anything but the admin token.
        Returns the admin token's id (:func:`admin_id`) for the audit."""
        token = bearer_token(request)
        if token is None:
            raise ApiError(401, MISSING_KEY, code=None, should_retry=False)
        if self._admin is None or not _matches(token_sha256(token), self._admin):
            raise ApiError(403, "This route needs the gateway's admin token.",
                           code="admin_only", should_retry=False)
        return admin_id(self._admin)
