"""Members and their tokens, managed live: the rules every member store applies.

Members named in the config are seeded into the store at start (and on reload) with
source ``config`` and stay managed by the config: the admin API answers 409 for them.
Members made through the admin API (source ``api``) live only in the store, with an
optional quota override, an optional expiry and up to :data:`MAX_TOKENS` tokens, so a
token is rotated without a gap: the new one works while the old one is still in use.

Tokens are stored as SHA-256 digests only; a revoked token's digest is kept (a
tombstone), so its holder is told it was revoked rather than that it is unknown.

This package root holds the rules (:class:`Members`), the record types and the
:class:`MemberStore` protocol. A store only loads everything and swaps one member's
record for another atomically (compare-and-set); every rule runs here, once, for both
:mod:`gateway.members.sqlite` (one process) and :mod:`gateway.members.redis` (every
replica, with pub/sub telling them of a change).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from gateway.config import RESERVED_USER_NAMES, USER_NAME, Config, QuotaLimits
from gateway.errors import ApiError, invalid

MAX_TOKENS = 2
# What an API member's quota may override (``blocked`` has its own admin routes).
QUOTA_KEYS = tuple(f.name for f in dataclasses.fields(QuotaLimits) if f.name != "blocked")
# Compare-and-set attempts before a change gives up (another admin kept winning).
SWAP_ATTEMPTS = 8
Source = Literal["config", "api"]


def token_sha256(token: str) -> str:
    # Header bytes that are not UTF-8 reach us as surrogates: hash them, don't crash.
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def new_token() -> str:
    """A strong member token: 256 bits, URL-safe, recognisable prefix."""
    return "vg-" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Token:
    """One token of a member: its digest, a public id to name it by, when it ends."""

    sha256: str
    id: str
    created_at: float
    expires_at: float | None = None


@dataclass(frozen=True)
class Member:
    """A member as the store keeps it. ``quota`` holds only the keys set for this member;
    the rest come from the config's ``quota_defaults`` (so a reload changes them)."""

    name: str
    source: Source
    created_at: float
    quota: Mapping[str, float | None] = field(default_factory=dict)
    expires_at: float | None = None
    tokens: tuple[Token, ...] = ()

    def limits(self, defaults: QuotaLimits) -> QuotaLimits:
        return dataclasses.replace(defaults, **self.quota)  # type: ignore[arg-type]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_json(raw: str | bytes) -> Member:
        d = json.loads(raw)
        return Member(d["name"], d["source"], d["created_at"], d.get("quota") or {},
                      d.get("expires_at"), tuple(Token(**t) for t in d.get("tokens") or ()))

    def public(self, defaults: QuotaLimits, now: float) -> dict[str, Any]:
        """What ``GET /admin/users`` shows: no token material, not even digests."""
        return {
            "name": self.name, "source": self.source, "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at), "expired": expired(self.expires_at, now),
            "quota": dataclasses.asdict(self.limits(defaults)),
            "quota_overrides": dict(self.quota),
            "tokens": [{"id": t.id, "created_at": iso(t.created_at),
                        "expires_at": iso(t.expires_at),
                        "expired": expired(t.expires_at, now)} for t in self.tokens],
        }


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def expired(expires_at: float | None, now: float) -> bool:
    return expires_at is not None and now >= expires_at


@dataclass(frozen=True)
class Snapshot:
    """Everything a store holds: the members by name and the revoked token digests."""

    members: Mapping[str, Member]
    revoked: frozenset[str]


class MemberStore(Protocol):
    """Where members live: :mod:`gateway.members.sqlite` or :mod:`gateway.members.redis`.
    Storage failures raise :class:`gateway.errors.StorageUnavailable`."""

    async def load(self) -> Snapshot: ...

    async def swap(self, name: str, old: Member | None, new: Member | None,
                   revoked: Sequence[str] = ()) -> bool:
        """Replace ``name``'s record ``old`` (None: absent) by ``new`` (None: remove) and
        add ``revoked`` digests as tombstones, atomically; False if the record is no
        longer ``old`` (another admin changed it first). Tells every replica."""
        ...

    async def watch(self, changed: Callable[[], Awaitable[None]]) -> None:
        """Run until cancelled, awaiting ``changed()`` after any change made anywhere
        (another replica included) and after any gap in which one may have been missed."""
        ...

    async def close(self) -> None: ...


# ---------------------------------------------------------------- input rules


def check_name(raw: object) -> str:
    if not isinstance(raw, str) or not USER_NAME.fullmatch(raw):
        raise invalid("Invalid 'name': use 1 to 64 letters, digits, '_', '.', '@' or '-', "
                      "starting with a letter or digit.", "name")
    if raw in RESERVED_USER_NAMES:
        raise invalid(f"Invalid 'name': '{raw}' is reserved.", "name")
    return raw


def parse_quota(raw: object) -> dict[str, float | None]:
    """A quota override from JSON: known keys only, non-negative numbers or null."""
    if not isinstance(raw, dict):
        raise invalid("Invalid 'quota': expected an object of limits.", "quota", "invalid_type")
    out: dict[str, float | None] = {}
    for key, value in raw.items():
        param = f"quota.{str(key)[:40]}"
        if key not in QUOTA_KEYS:
            raise invalid(f"Unknown quota key '{str(key)[:40]}' (known: "
                          f"{', '.join(QUOTA_KEYS)}).", param, "unknown_parameter")
        number = key == "budget_usd_per_month"
        # json.loads takes NaN and Infinity: a NaN limit would refuse everything on
        # SQLite, mean unlimited on Redis and make /v1/usage answer invalid JSON.
        if value is not None and (isinstance(value, bool) or not isinstance(
                value, (int, float) if number else int) or not math.isfinite(value)
                or value < 0 or value >= 2**53):
            kind = "a non-negative number" if number else "a non-negative integer"
            raise invalid(f"Invalid '{param}': expected {kind} or null (unlimited).", param)
        out[key] = float(value) if number and value is not None else value
    return out


def parse_time(raw: object, param: str, now: float) -> float | None:
    """An expiry from JSON: null, unix seconds or ISO 8601 (a zone, else UTC); in the
    future."""
    if raw is None:
        return None
    ts = instant(raw, param)
    if ts <= now:
        raise invalid(f"Invalid '{param}': {iso(ts)} is in the past.", param)
    return ts


def instant(raw: object, param: str) -> float:
    """Unix seconds or ISO 8601 (a zone, else UTC), from JSON or a query string: one
    reading for every admin route (``?since=2030-01-01T00:00`` is UTC here too)."""
    if isinstance(raw, str):
        with contextlib.suppress(ValueError):
            raw = float(raw)  # a query string's unix seconds
    if isinstance(raw, bool):
        raw = "bool"  # refused below
    if isinstance(raw, (int, float)):
        try:
            ts = float(raw)  # OverflowError for an integer of hundreds of digits
        except OverflowError:
            ts = math.inf  # refused below
    elif isinstance(raw, str):
        try:
            parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            raise invalid(f"Invalid '{param}': expected unix seconds or an ISO 8601 time "
                          "(e.g. 2030-01-31T00:00:00Z).", param) from None
        ts = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    else:
        raise invalid(f"Invalid '{param}': expected unix seconds or an ISO 8601 time.",
                      param, "invalid_type")
    if not math.isfinite(ts) or not 0 <= ts < 253402300800:  # before year 10000
        raise invalid(f"Invalid '{param}': out of range.", param)
    return ts


def check_keys(body: Mapping[str, object], known: Sequence[str]) -> None:
    for key in body:
        if key not in known:
            shown = str(key)[:40]
            raise invalid(f"Unknown field '{shown}' (known: {', '.join(known)}).", shown,
                          "unknown_parameter")


# ---------------------------------------------------------------- rules


def not_found(name: str) -> ApiError:
    return ApiError(404, f"No member named '{name[:64]}'.", code="user_not_found",
                    should_retry=False)


def managed_by_config(name: str) -> ApiError:
    return ApiError(409, f"Member '{name}' is managed by the gateway config (users: in the "
                    "config file, source: config); change it there and reload the gateway.",
                    code="managed_by_config", param="name", should_retry=False)


def _new_token(now: float, expires_at: float | None) -> tuple[str, Token]:
    token = new_token()
    return token, Token(token_sha256(token), "tok_" + secrets.token_hex(4), now, expires_at)


@dataclass(frozen=True)
class Issued:
    """A change's outcome: the member now, and a new token (shown once) if one was made."""

    member: Member | None
    token: str | None = None
    revoked: int = 0


Change = Callable[[Member | None], tuple[Member | None, Sequence[str], str | None]]


def _replace_with(new: Member) -> Change:
    return lambda _current: (new, (), None)


class Members:
    """The admin API's rules over a :class:`MemberStore`. ``clock`` (unix seconds) is
    public so tests can move time."""

    def __init__(self, store: MemberStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    async def seed(self, config: Config) -> None:
        """Make the store's ``config`` members exactly the config's ``users:``. A config
        member replaces an API member of the same name (the config wins)."""
        snap = await self.store.load()
        now = self.clock()
        for name, user in config.users.items():
            digests = (user.token_sha256,) if user.token_sha256 else ()
            old = snap.members.get(name)
            # By digest, not by record: the same member seeded again (every start and
            # reload) is no change, which would bump the version and reload every replica.
            if old is not None and old.source == "config" and tuple(
                    t.sha256 for t in old.tokens) == digests:
                continue
            tokens = tuple(Token(d, "config", now) for d in digests)
            await self._change(name, _replace_with(
                Member(name, "config", old.created_at if old else now, tokens=tokens)))
        for name, old in snap.members.items():
            if old.source == "config" and name not in config.users:
                await self._change(name, lambda cur: (
                    None, [t.sha256 for t in cur.tokens] if cur else [], None))

    async def _change(self, name: str, change: Change) -> Issued:
        """Apply ``change`` to ``name``'s current record with compare-and-set, retrying
        while another admin (or replica) changes it at the same moment."""
        for _ in range(SWAP_ATTEMPTS):
            current = (await self.store.load()).members.get(name)
            new, revoked, token = change(current)
            if await self.store.swap(name, current, new, revoked):
                return Issued(new, token, len(revoked))
        raise ApiError(409, f"Member '{name}' changed concurrently; try again.",
                       code="conflict", should_retry=True)

    @staticmethod
    def _api_member(name: str, current: Member | None) -> Member:
        if current is None:
            raise not_found(name)
        if current.source == "config":
            raise managed_by_config(name)
        return current

    async def get(self, name: str) -> Member:
        member = (await self.store.load()).members.get(name)
        if member is None:
            raise not_found(name)
        return member

    async def create(self, name: str, quota: Mapping[str, float | None],
                     expires_at: float | None) -> Issued:
        def change(cur: Member | None) -> tuple[Member | None, Sequence[str], str | None]:
            if cur is not None:
                if cur.source == "config":
                    raise managed_by_config(name)
                raise ApiError(409, f"A member named '{name}' already exists.",
                               code="user_exists", param="name", should_retry=False)
            now = self.clock()
            token, record = _new_token(now, None)
            return Member(name, "api", now, dict(quota), expires_at, (record,)), (), token
        return await self._change(name, change)

    async def update(self, name: str, quota: Mapping[str, float | None] | None,
                     expires_at: float | None, set_expiry: bool) -> Issued:
        """PATCH: ``quota`` keys merge into the member's override (a null limit is
        unlimited); ``set_expiry`` says whether ``expires_at`` was given (null clears it)."""
        def change(cur: Member | None) -> tuple[Member | None, Sequence[str], str | None]:
            m = self._api_member(name, cur)
            new = dataclasses.replace(
                m, quota={**m.quota, **(quota or {})},
                expires_at=expires_at if set_expiry else m.expires_at)
            return new, (), None
        return await self._change(name, change)

    async def rotate(self, name: str, revoke_others: bool, expires_at: float | None
                     ) -> Issued:
        """A new token. With :data:`MAX_TOKENS` already held, the oldest is revoked to
        make room (so routine rotations never fail and never leave a gap)."""
        def change(cur: Member | None) -> tuple[Member | None, Sequence[str], str | None]:
            m = self._api_member(name, cur)
            token, record = _new_token(self.clock(), expires_at)
            kept = () if revoke_others else m.tokens[-(MAX_TOKENS - 1):]
            dropped = [t.sha256 for t in m.tokens if t not in kept]
            return dataclasses.replace(m, tokens=(*kept, record)), dropped, token
        return await self._change(name, change)

    async def revoke(self, name: str, token_id: str | None = None) -> Issued:
        """Revoke every token of ``name``, or the one called ``token_id``."""
        def change(cur: Member | None) -> tuple[Member | None, Sequence[str], str | None]:
            m = self._api_member(name, cur)
            if token_id is not None and token_id not in {t.id for t in m.tokens}:
                raise ApiError(404, f"Member '{name}' has no token '{token_id[:40]}'.",
                               code="token_not_found", param="token_id",
                               should_retry=False)
            gone = [t for t in m.tokens if token_id is None or t.id == token_id]
            kept = tuple(t for t in m.tokens if t not in gone)
            return dataclasses.replace(m, tokens=kept), [t.sha256 for t in gone], None
        return await self._change(name, change)

    async def remove(self, name: str) -> Issued:
        def change(cur: Member | None) -> tuple[Member | None, Sequence[str], str | None]:
            m = self._api_member(name, cur)
            return None, [t.sha256 for t in m.tokens], None
        return await self._change(name, change)
