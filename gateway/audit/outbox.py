"""The shipper: moves audit records from the local SQLite outbox to the shared database.

A record is answered once it is committed to the outbox; PostgreSQL may be slow or down
meanwhile. The shipper sends the oldest rows in batches, in one transaction each, and
removes them from the outbox only after that commit. The destination ignores a
``request_id`` it already holds, so a batch committed but never acknowledged (the
replica killed between the two commits, or the commit's answer lost) is shipped again
without duplicates. After a failure it retries with exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import structlog

from gateway.audit import OutboxStats

log = structlog.get_logger("gateway.audit")
Row = tuple[int, tuple[object, ...]]


class Outbox(Protocol):
    def pending(self, limit: int) -> list[Row]: ...
    def acknowledge(self, first_id: int, last_id: int) -> None: ...
    def backlog(self) -> OutboxStats: ...


class Sink(Protocol):
    async def insert(self, rows: Sequence[tuple[object, ...]]) -> None:
        """Commit ``rows`` (values in ``NAMES`` order), skipping request ids it holds."""


class Shipper:
    """One replica's shipping loop (:meth:`run`), woken by each committed write."""

    def __init__(self, outbox: Outbox, sink: Sink, *, batch: int = 500,
                 idle_seconds: float = 1.0, backoff_initial: float = 0.5,
                 backoff_max: float = 30.0, describe: Callable[[BaseException], str] = str,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._outbox, self._sink = outbox, sink
        self.batch = batch
        self.idle_seconds = idle_seconds
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self._describe, self._sleep = describe, sleep
        self._wake = asyncio.Event()
        self.shipped = 0
        self.last_error: str | None = None  # for the log: the sink's ``describe``
        self.failure: str | None = None  # the class of the last failure, for /readyz

    def wake(self) -> None:
        """A record was committed to the outbox: ship it without waiting for the tick."""
        self._wake.set()

    async def ship_once(self) -> int:
        """Ship the oldest batch; how many rows (0: the outbox is empty)."""
        self._wake.clear()
        rows = self._outbox.pending(self.batch)
        if not rows:
            return 0
        await self._sink.insert([values for _, values in rows])
        self._outbox.acknowledge(rows[0][0], rows[-1][0])
        self.shipped += len(rows)
        return len(rows)

    async def run(self) -> None:
        """Ship until cancelled: batch after batch while there are full ones, then wait
        for a write (or ``idle_seconds``); after a failure back off and try again."""
        delay = self.backoff_initial
        while True:
            try:
                shipped = await self.ship_once()
            except Exception as exc:  # PostgreSQL away or failing: the outbox keeps all
                detail = self._describe(exc)
                if detail != self.last_error:
                    log.warning("audit_ship_failed", error=type(exc).__name__,
                                detail=detail, retry_in_seconds=delay,
                                outbox_records=self._outbox.backlog().records)
                self.last_error, self.failure = detail, type(exc).__name__
                await self._sleep(delay)
                delay = min(delay * 2, self.backoff_max)
                continue
            if self.last_error is not None:
                log.info("audit_ship_resumed", outbox_records=self._outbox.backlog().records)
                self.last_error = self.failure = None
            delay = self.backoff_initial
            if shipped >= self.batch:
                await asyncio.sleep(0)  # requests queued meanwhile go first
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.idle_seconds)
