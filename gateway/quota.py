"""Per-user quotas: admission, image reservations, the durable ledger, blocks.

Two steps, so cache hits cost no images: :meth:`QuotaStore.admit` takes a request slot
(blocked users, the sliding requests-per-minute window, ``max_concurrent``) and
:meth:`QuotaStore.reserve` reserves images (day, month, USD budget) only when a backend
must generate. A reservation is committed for what was delivered, or refunded.

This module holds the rules and the SQLite store for one process. Every check-and-take
runs without an ``await`` between the check and the take on the single event-loop
thread, so no interleaving of concurrent requests admits more than a limit; the ledger
commit is one SQLite transaction (WAL), durable before the client sees its 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple, Protocol

from gateway.auth import Principal
from gateway.errors import ApiError
from gateway.sqlite import GroupCommit, open_db

# A reset further away than this is "hours away": the SDK should not retry.
NO_RETRY_AFTER_SECONDS = 120


class LimitStatus(NamedTuple):
    """One limit as ``/v1/usage`` and the ``x-ratelimit-*`` headers show it (a named
    tuple: five are made per request, at a third of a frozen dataclass's cost)."""

    name: str
    limit: float | None
    used: float
    remaining: float | None
    reset_at: float | None  # unix seconds

    def as_json(self) -> dict[str, object]:
        return {
            "limit": self.limit,
            "used": self.used,
            "remaining": self.remaining,
            "resets_at": _iso(self.reset_at) if self.reset_at else None,
        }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``12ms``, ``1s``, ``6m0s``, ``5h3m0s``."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    s = int(seconds + 0.999)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


def day_bounds(now: float) -> tuple[str, float]:
    """Today's ledger period (UTC) and when it resets."""
    return _periods(int(now // 86400))[:2]


def month_bounds(now: float) -> tuple[str, float]:
    """This calendar month's ledger period (UTC) and when it resets."""
    return _periods(int(now // 86400))[2:]


@functools.lru_cache(maxsize=4)
def _periods(day: int) -> tuple[str, float, str, float]:
    """Both periods of a UTC day number (a pure function: memoised, every request asks)."""
    start = datetime.fromtimestamp(day * 86400, UTC)
    month = start.replace(day=1)
    nxt = (month + timedelta(days=32)).replace(day=1)
    return (start.strftime("d:%Y-%m-%d"), (start + timedelta(days=1)).timestamp(),
            month.strftime("m:%Y-%m"), nxt.timestamp())


def image_headers(status: LimitStatus | None) -> dict[str, str]:
    """``x-ratelimit-*-images`` for the tightest image limit (none when unlimited)."""
    if status is None or status.limit is None:
        return {}
    now = time.time()
    return {
        "x-ratelimit-limit-images": str(int(status.limit)),
        "x-ratelimit-remaining-images": str(max(0, int(status.remaining or 0))),
        "x-ratelimit-reset-images": duration(max(0.0, (status.reset_at or now) - now)),
    }


def ratelimit_headers(statuses: list[LimitStatus]) -> dict[str, str]:
    """``x-ratelimit-*``: the tightest image limit, and the request limit when set."""
    headers = image_headers(tightest(statuses))
    rpm = next((s for s in statuses if s.name == "requests_per_minute"), None)
    if rpm is not None and rpm.limit is not None:
        now = time.time()
        headers.update({
            "x-ratelimit-limit-requests": str(int(rpm.limit)),
            "x-ratelimit-remaining-requests": str(max(0, int(rpm.remaining or 0))),
            "x-ratelimit-reset-requests": duration(max(0.0, (rpm.reset_at or now) - now)),
        })
    return headers


class QuotaRejected(ApiError):
    """A 429/403 from a limit; never shared with coalesced waiters."""

    def __init__(self, status: int, message: str, code: str, limit: str,
                 retry_after: float | None, headers: Mapping[str, str]) -> None:
        hdrs = dict(headers)
        should_retry: bool | None = None
        if retry_after is not None:
            hdrs["retry-after"] = str(max(1, int(retry_after + 0.999)))
            if retry_after > NO_RETRY_AFTER_SECONDS:
                should_retry = False
        if status == 403:
            should_retry = False
        super().__init__(status, message, code=code, headers=hdrs, should_retry=should_retry)
        self.limit = limit


def blocked_error(name: str) -> QuotaRejected:
    return QuotaRejected(403, f"Gateway user '{name}' is blocked; ask the gateway admin.",
                         "user_blocked", "blocked", None, {})


def _images_rejection(limit: str, status: LimitStatus, wanted: int) -> QuotaRejected:
    wait = max(0.0, (status.reset_at or time.time()) - time.time())
    what = {"images_per_day": "images per day (UTC)", "images_per_month":
            "images per calendar month (UTC)"}.get(limit, limit)
    message = (f"Quota exceeded: {int(status.limit or 0)} {what}. {int(status.remaining or 0)}"
               f" remaining, {wanted} requested; resets in {duration(wait)} at "
               f"{_iso(status.reset_at or time.time())}.")
    return QuotaRejected(429, message, "quota_exceeded", limit, wait, image_headers(status))


def _budget_rejection(status: LimitStatus, cost: float, headers: Mapping[str, str]
                      ) -> QuotaRejected:
    wait = max(0.0, (status.reset_at or time.time()) - time.time())
    return QuotaRejected(
        429, f"Quota exceeded: monthly budget of {status.limit or 0:.2f} USD; "
        f"{status.remaining or 0:.3f} USD remaining, this request needs {cost:.3f} USD; "
        f"resets in {duration(wait)}.", "quota_exceeded", status.name, wait, headers)


def reservation_refusal(statuses: list[LimitStatus], images: int, cost: float,
                        fallback: str | None = None) -> QuotaRejected | None:
    """Why reserving ``images`` (``cost`` USD) is refused, or None if it fits.

    When several limits refuse, the one that resets last is reported: a client retrying
    at an earlier reset (tomorrow, with the month used up) would only be refused again.
    ``fallback`` names a limit that refused elsewhere (a Redis script) in case these
    statuses, read a moment later, no longer show it.
    """
    failing = [s for s in statuses if s.limit is not None and (
        (s.name in ("images_per_day", "images_per_month") and (s.remaining or 0) < images)
        or (s.name == "budget_usd_per_month" and (s.remaining or 0) < cost - 1e-9))]
    if not failing:
        if fallback is None:
            return None
        failing = [s for s in statuses if s.name == fallback]
    worst = max(failing, key=lambda s: s.reset_at or 0.0)
    if worst.name == "budget_usd_per_month":
        return _budget_rejection(worst, cost, ratelimit_headers(statuses))
    return _images_rejection(worst.name, worst, images)


@dataclass
class Reservation:
    """Images (and USD) held for one request until commit or refund.

    ``made_at`` (unix seconds) is when the hold was taken: the commit charges the day and
    month of that moment, so a request admitted at 23:59:59 whose backend answers after
    midnight is charged to the period whose quota admitted it."""

    user: str
    images: int
    cost: float
    size: str
    made_at: float
    settled: bool = False


class QuotaStore(Protocol):
    """What the handler needs; SQLite here, Redis in ``gateway.state_redis``."""

    def admit(self, principal: Principal) -> contextlib.AbstractAsyncContextManager[None]: ...

    async def reserve(self, principal: Principal, images: int, cost: float, size: str
                      ) -> Reservation: ...

    async def commit(self, reservation: Reservation, images: int, cost: float) -> None: ...

    async def refund(self, reservation: Reservation) -> None: ...

    def refund_soon(self, reservation: Reservation) -> None:
        """:meth:`refund` without waiting for it (from a callback); never raises."""
        ...

    def count_request(self, principal: Principal, cache_hit: bool) -> Awaitable[None]:
        """Count one answered request (a cache hit or not). Returns at once: await the
        result before answering, after whatever else the answer waits for."""
        ...

    async def usage(self, principal: Principal) -> list[LimitStatus]: ...

    async def all_usage(self) -> dict[str, dict[str, float]]: ...

    async def is_blocked(self, name: str) -> bool: ...

    async def set_blocked(self, name: str, blocked: bool) -> None: ...

    async def close(self) -> None: ...


def tightest(statuses: list[LimitStatus]) -> LimitStatus | None:
    images = [s for s in statuses if s.name in ("images_per_day", "images_per_month")
              and s.limit is not None]
    return min(images, key=lambda s: s.remaining or 0, default=None)


BUDGETS = ("images_per_day", "images_per_month", "budget_usd_per_month")


def budget_used(statuses: list[LimitStatus]) -> float:
    """The share (0..1) of the member's tightest image or money budget that is used."""
    ratios = [s.used / s.limit for s in statuses if s.limit and s.name in BUDGETS]
    return min(1.0, max(ratios, default=0.0))


_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (
    user TEXT NOT NULL, period TEXT NOT NULL,
    images INTEGER NOT NULL DEFAULT 0, requests INTEGER NOT NULL DEFAULT 0,
    cache_hits INTEGER NOT NULL DEFAULT 0, spend REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (user, period)
);
CREATE TABLE IF NOT EXISTS blocks (user TEXT PRIMARY KEY, since REAL NOT NULL);
"""


@dataclass
class _LedgerBatch:
    """The ledger additions of one loop turn: deltas per (user, period), and the
    reservations they settle."""

    deltas: dict[tuple[str, str], tuple[int, int, int, float]] = field(default_factory=dict)
    settles: list[Reservation] = field(default_factory=list)
    done: asyncio.Future[None] = field(init=False)


class SqliteQuota:
    """Quotas for a single gateway process: ledger in SQLite, in-flight state in memory.

    Reservations, the minute window and the in-flight count live in memory because they
    die with the process anyway: after a crash no reserved request can still deliver.
    This process is the ledger's only writer, so the rows it has read or written and
    the block list are also kept in memory: admitting a request reads no SQLite.
    """

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time) -> None:
        # The wall clock (unix seconds) that picks ledger periods; tests inject their own.
        self.clock = clock
        self._db = open_db(path, sole_writer=True)
        self._db.executescript(_SCHEMA)
        self._writes = GroupCommit(self._db)
        self._reserved: dict[str, int] = defaultdict(int)
        self._reserved_cost: dict[str, float] = defaultdict(float)
        self._window: dict[str, deque[float]] = defaultdict(deque)
        self._inflight: dict[str, int] = defaultdict(int)
        self._rows: dict[tuple[str, str], tuple[int, int, int, float]] = {}
        self._batch: _LedgerBatch | None = None
        self._blocked = {user for (user,) in self._db.execute("SELECT user FROM blocks")}

    # ---- reads
    def _ledger(self, user: str, period: str) -> tuple[int, int, int, float]:
        row = self._rows.get((user, period))
        if row is None:
            row = self._db.execute(
                "SELECT images, requests, cache_hits, spend FROM ledger "
                "WHERE user=? AND period=?", (user, period)).fetchone() or (0, 0, 0, 0.0)
            if len(self._rows) >= 4096:  # old periods and users: re-read when needed
                self._rows.clear()
            self._rows[(user, period)] = row
        return row

    def _statuses(self, principal: Principal, now: float) -> list[LimitStatus]:
        q, user = principal.quota, principal.name
        day, day_reset = day_bounds(now)
        month, month_reset = month_bounds(now)
        d_images, _, _, _ = self._ledger(user, day)
        m_images, _, _, m_spend = self._ledger(user, month)
        held = self._reserved[user]
        held_cost = self._reserved_cost[user]
        window = self._prune(user, now)
        out = []
        for name, limit, used, reset in (
            ("images_per_day", q.images_per_day, d_images + held, day_reset),
            ("images_per_month", q.images_per_month, m_images + held, month_reset),
            ("budget_usd_per_month", q.budget_usd_per_month, round(m_spend + held_cost, 6),
             month_reset),
            ("requests_per_minute", q.requests_per_minute, len(window),
             (window[0] + 60) if window else now),
            ("max_concurrent", q.max_concurrent, self._inflight[user], None),
        ):
            remaining = None if limit is None else max(0, limit - used)
            out.append(LimitStatus(name, limit, used, remaining, reset))
        return out

    def _prune(self, user: str, now: float) -> deque[float]:
        window = self._window[user]
        while window and window[0] <= now - 60:
            window.popleft()
        return window

    async def usage(self, principal: Principal) -> list[LimitStatus]:
        return self._statuses(principal, self.clock())

    async def all_usage(self) -> dict[str, dict[str, float]]:
        now = self.clock()
        day, _ = day_bounds(now)
        month, _ = month_bounds(now)
        out: dict[str, dict[str, float]] = {}
        for user, period, images, requests, hits, spend in self._db.execute(
            "SELECT user, period, images, requests, cache_hits, spend FROM ledger "
            "WHERE period IN (?, ?)", (day, month)):
            row = out.setdefault(user, {"images_today": 0, "images_this_month": 0,
                                        "requests_today": 0, "cache_hits_today": 0,
                                        "spend_usd_this_month": 0.0})
            if period == day:
                row.update(images_today=images, requests_today=requests,
                           cache_hits_today=hits)
            else:
                row.update(images_this_month=images, spend_usd_this_month=round(spend, 6))
        return out

    # ---- blocks
    async def is_blocked(self, name: str) -> bool:
        return name in self._blocked

    async def set_blocked(self, name: str, blocked: bool) -> None:
        if blocked:
            self._db.execute("INSERT OR REPLACE INTO blocks VALUES (?, ?)",
                             (name, self.clock()))
            self._blocked.add(name)
        else:
            self._db.execute("DELETE FROM blocks WHERE user=?", (name,))
            self._blocked.discard(name)

    # ---- admission
    @contextlib.asynccontextmanager
    async def admit(self, principal: Principal) -> AsyncIterator[None]:
        """Hold a request slot: blocked -> 403, minute window or in-flight -> 429."""
        user, q = principal.name, principal.quota
        if q.blocked or await self.is_blocked(user):
            raise blocked_error(user)
        now = self.clock()
        window = self._prune(user, now)
        if q.requests_per_minute is not None and len(window) >= q.requests_per_minute:
            wait = window[0] + 60 - now
            raise QuotaRejected(
                429, f"Rate limit reached: {q.requests_per_minute} requests per minute; "
                f"0 remaining, resets in {duration(wait)}.", "rate_limit_exceeded",
                "requests_per_minute", wait,
                ratelimit_headers(self._statuses(principal, now)))
        if q.max_concurrent is not None and self._inflight[user] >= q.max_concurrent:
            raise QuotaRejected(
                429, f"Rate limit reached: at most {q.max_concurrent} requests in flight at "
                "once; wait for one to finish.", "rate_limit_exceeded", "max_concurrent", 1,
                ratelimit_headers(self._statuses(principal, now)))
        window.append(now)
        self._inflight[user] += 1
        try:
            yield
        finally:
            self._inflight[user] -= 1

    async def reserve(self, principal: Principal, images: int, cost: float, size: str
                      ) -> Reservation:
        now = self.clock()
        refusal = reservation_refusal(self._statuses(principal, now), images, cost)
        if refusal is not None:
            raise refusal
        self._reserved[principal.name] += images
        self._reserved_cost[principal.name] += cost
        return Reservation(principal.name, images, cost, size, now)

    def _release(self, r: Reservation) -> None:
        if not r.settled:
            r.settled = True
            self._reserved[r.user] -= r.images
            self._reserved_cost[r.user] -= r.cost

    def _add(self, user: str, *, images: int = 0, spend: float = 0.0, requests: int = 0,
             cache_hits: int = 0, settle: Reservation | None = None,
             at: float | None = None) -> asyncio.Future[None]:
        """Add to the ledger rows of the day and month of ``at`` (default: now);
        resolves once committed.

        Everything added during one loop turn is summed per row into one
        :class:`_LedgerBatch`, written in the transaction this turn's writes share: 16
        cache hits of one member are two upserts, not 32. ``settle`` is released when
        the in-memory rows take the addition, so its images are never counted twice.
        """
        batch = self._batch
        if batch is None or batch.done.done():  # its commit (or failure) is over: a new one
            batch = self._batch = _LedgerBatch()
            batch.done = self._writes.submit(functools.partial(self._write_batch, batch),
                                             functools.partial(self._apply_batch, batch))
        day, _, month, _ = _periods(int((self.clock() if at is None else at) // 86400))
        for period in (day, month):
            i, r, h, sp = batch.deltas.get((user, period), (0, 0, 0, 0.0))
            batch.deltas[(user, period)] = (i + images, r + requests, h + cache_hits,
                                            sp + spend)
        if settle is not None:
            batch.settles.append(settle)
        return batch.done

    def _write_batch(self, batch: _LedgerBatch, db: sqlite3.Connection) -> None:
        db.executemany(
            "INSERT INTO ledger (user, period, images, requests, cache_hits, spend) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(user, period) DO UPDATE SET "
            "images = images + excluded.images, spend = spend + excluded.spend, "
            "requests = requests + excluded.requests, "
            "cache_hits = cache_hits + excluded.cache_hits",
            [(*key, *delta) for key, delta in batch.deltas.items()])

    def _apply_batch(self, batch: _LedgerBatch) -> None:
        for key, (images, requests, hits, spend) in batch.deltas.items():
            row = self._rows.get(key)  # rows not in memory are read from the file later
            if row is not None:
                self._rows[key] = (row[0] + images, row[1] + requests, row[2] + hits,
                                   row[3] + spend)
        for reservation in batch.settles:
            self._release(reservation)

    async def commit(self, reservation: Reservation, images: int, cost: float) -> None:
        if reservation.settled:
            return
        await asyncio.shield(self._add(reservation.user, images=images, spend=cost,
                                       settle=reservation, at=reservation.made_at))

    async def refund(self, reservation: Reservation) -> None:
        self._release(reservation)

    def refund_soon(self, reservation: Reservation) -> None:
        self._release(reservation)

    def count_request(self, principal: Principal, cache_hit: bool) -> Awaitable[None]:
        return self._add(principal.name, requests=1, cache_hits=int(cache_hit))

    async def close(self) -> None:
        try:
            self._writes.flush()
        finally:
            self._db.close()
