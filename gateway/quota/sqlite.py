"""The quota store of one gateway process: the ledger in SQLite, the rest in memory.

Every check-and-take runs without an ``await`` between the check and the take on the
single event-loop thread, so no interleaving of concurrent requests admits more than a
limit; the ledger commit is one SQLite transaction (WAL), durable before the client
sees its 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from gateway.auth import Principal
from gateway.quota import (
    LimitStatus,
    Reservation,
    Usage,
    blocked_error,
    day_bounds,
    month_bounds,
    periods,
    rate_refusal,
    ratelimit_headers,
    reservation_refusal,
    statuses,
)
from gateway.sqlite import GroupCommit, failures_translated, open_db, translated_future

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
    That is why this process claims the file (:class:`gateway.sqlite.SoleWriter`): a
    second one would not see them. Ledger rows and blocks are read from the file when
    needed (an in-memory copy of them paid nothing measurable on a team's mixed traffic:
    ``make bench``, speed tricks A/B).
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
        self._batch: _LedgerBatch | None = None

    # ---- reads
    def _ledger(self, user: str, period: str) -> tuple[int, int, int, float]:
        row: tuple[int, int, int, float] = self._db.execute(
            "SELECT images, requests, cache_hits, spend FROM ledger "
            "WHERE user=? AND period=?", (user, period)).fetchone() or (0, 0, 0, 0.0)
        return row

    def _statuses(self, principal: Principal, now: float) -> list[LimitStatus]:
        user = principal.name
        day, _, month, _ = periods(int(now // 86400))
        window = self._prune(user, now)
        with failures_translated():
            d_images = self._ledger(user, day)[0]
            m_images, _, _, m_spend = self._ledger(user, month)
        return statuses(principal.quota, Usage(
            d_images, m_images, m_spend, self._reserved[user], self._reserved_cost[user],
            len(window), (window[0] + 60) if window else now, self._inflight[user]), now)

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
        with failures_translated():
            rows = self._db.execute(
                "SELECT user, period, images, requests, cache_hits, spend FROM ledger "
                "WHERE period IN (?, ?)", (day, month)).fetchall()
        for user, period, images, requests, hits, spend in rows:
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
        with failures_translated():
            return self._db.execute("SELECT 1 FROM blocks WHERE user=?",
                                    (name,)).fetchone() is not None

    async def set_blocked(self, name: str, blocked: bool) -> None:
        with failures_translated():
            if blocked:
                self._db.execute("INSERT OR REPLACE INTO blocks VALUES (?, ?)",
                                 (name, self.clock()))
            else:
                self._db.execute("DELETE FROM blocks WHERE user=?", (name,))

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
            raise rate_refusal("requests_per_minute", q, window[0] + 60 - now,
                               ratelimit_headers(self._statuses(principal, now)))
        if q.max_concurrent is not None and self._inflight[user] >= q.max_concurrent:
            raise rate_refusal("max_concurrent", q, 1,
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
        cache hits of one member are two upserts, not 32. ``settle`` is released
        right after the commit, so its images are never counted twice.
        """
        batch = self._batch
        if batch is None or batch.done.done():  # its commit (or failure) is over: a new one
            batch = self._batch = _LedgerBatch()
            batch.done = self._writes.submit(functools.partial(self._write_batch, batch),
                                             functools.partial(self._apply_batch, batch))
        day, _, month, _ = periods(int((self.clock() if at is None else at) // 86400))
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
        for reservation in batch.settles:
            self._release(reservation)

    async def commit(self, reservation: Reservation, images: int, cost: float) -> None:
        if reservation.settled:
            return
        with failures_translated():
            await asyncio.shield(self._add(reservation.user, images=images, spend=cost,
                                           settle=reservation, at=reservation.made_at))

    async def refund(self, reservation: Reservation) -> None:
        self._release(reservation)

    def refund_soon(self, reservation: Reservation) -> None:
        self._release(reservation)

    def count_request(self, principal: Principal, cache_hit: bool) -> Awaitable[None]:
        return translated_future(self._add(principal.name, requests=1,
                                           cache_hits=int(cache_hit)))

    async def close(self) -> None:
        try:
            self._writes.flush()
        finally:
            self._db.close()
