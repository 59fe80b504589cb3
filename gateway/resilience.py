"""Retry policy, circuit breaker and concurrency limiter: one of each per backend.

They are small and free of I/O so the router can compose them and tests can drive them
with a fake clock. The router decides *what* failed; these decide *whether and when* to
try again.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from gateway.backends.base import BackendError
from gateway.config import BreakerConfig, RetryConfig

Clock = Callable[[], float]


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and full jitter.

    ``delay`` answers how long to wait before attempt ``attempt + 1`` or ``None`` when
    the policy says stop: attempts used up, or the upstream asked for a wait longer than
    ``retry_after_cap_seconds`` (waiting that long inside one client request helps no
    one; the client gets the truthful ``retry-after`` instead).
    """

    config: RetryConfig
    rng: Callable[[], float] = random.random

    def delay(self, attempt: int, retry_after: float | None = None) -> float | None:
        c = self.config
        if attempt >= c.max_attempts:
            return None
        if retry_after is not None:
            return retry_after if retry_after <= c.retry_after_cap_seconds else None
        ceiling = min(c.backoff_max_seconds, c.backoff_initial_seconds * 2.0 ** (attempt - 1))
        # Half fixed, half jitter: never zero, never in lock-step with other clients.
        return ceiling / 2 + self.rng() * ceiling / 2


class CircuitBreaker:
    """Closed -> open after ``failure_threshold`` consecutive failed calls; after
    ``cooldown_seconds`` one probe call is let through (half-open): its success closes
    the circuit, its failure opens it for another cool-down.

    ``on_change(state)`` reports every transition (the router feeds Metrics.set_breaker).
    """

    def __init__(self, config: BreakerConfig, on_change: Callable[[str], None] | None = None,
                 clock: Clock = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._on_change = on_change or (lambda state: None)
        self._state = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half_open`` (cool-down over, a probe may go)."""
        if self._state == "open" and self.retry_in() == 0:
            return "half_open"
        return self._state

    @property
    def failures(self) -> int:
        return self._failures

    def retry_in(self) -> float:
        """Seconds until a probe is allowed (0 when closed or the cool-down is over)."""
        if self._state != "open":
            return 0.0
        return max(0.0, self._opened_at + self.config.cooldown_seconds - self.clock())

    def allow(self) -> bool:
        """May a call go to the backend now? Claims the probe slot when half-open."""
        if self._state == "closed":
            return True
        if self._state == "open" and self.retry_in() == 0:
            self._set("half_open")
        if self._state == "half_open" and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self._failures = 0
        self._probing = False
        self._set("closed")

    def failure(self) -> None:
        self._failures += 1
        if self._state == "half_open" or self._failures >= self.config.failure_threshold:
            self._probing = False
            self._opened_at = self.clock()
            self._set("open")

    def release(self) -> None:
        """A call ended without a verdict (the client left): free the probe slot."""
        self._probing = False

    def _set(self, state: str) -> None:
        if state != self._state:
            self._state = state
            self._on_change(state)


class ConcurrencyLimiter:
    """At most ``limit`` calls in flight (``None``: unlimited); a caller waits at most
    ``queue_timeout`` for a slot, then gets 503 ``upstream_busy`` with a retry-after.
    """

    def __init__(self, name: str, limit: int | None, queue_timeout: float) -> None:
        self.name = name
        self.limit = limit
        self.queue_timeout = queue_timeout
        self._sem = asyncio.Semaphore(limit) if limit else None
        self.in_flight = 0
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        sem = self._sem
        if sem is not None:
            self.waiting += 1
            try:
                async with asyncio.timeout(self.queue_timeout):
                    await sem.acquire()
            except TimeoutError:
                raise BackendError(
                    503, f"Backend {self.name!r} is at its concurrency limit; try again "
                    "shortly.", code="upstream_busy", kind="busy", retryable=True,
                    trips_breaker=False,
                    headers={"retry-after": str(max(1, math.ceil(self.queue_timeout)))},
                ) from None
            finally:
                self.waiting -= 1
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            if sem is not None:
                sem.release()
