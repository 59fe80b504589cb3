"""The retry policy, circuit breaker and concurrency limiter on their own (fake clock)."""

from __future__ import annotations

import asyncio
from email.utils import formatdate

import pytest
from support import eventually

from gateway.backends.base import BackendError
from gateway.backends.http import parse_retry_after
from gateway.config import BreakerConfig, RetryConfig
from gateway.metrics import Metrics
from gateway.resilience import CircuitBreaker, ConcurrencyLimiter, RetryPolicy


def test_retry_after_parsing() -> None:
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"Retry-After": "1.5"}) == 1.5
    assert parse_retry_after({"retry-after": formatdate(1000.0 + 12, usegmt=True)},
                             now=1000.0) == 12
    for bad in ("soon", "-1", "nan", ""):
        assert parse_retry_after({"retry-after": bad}) is None
    assert parse_retry_after({}) is None


def test_backoff_is_exponential_jittered_capped_and_bounded() -> None:
    config = RetryConfig(max_attempts=5, backoff_initial_seconds=0.5, backoff_max_seconds=2.0,
                         retry_after_cap_seconds=20.0)
    low, high = RetryPolicy(config, rng=lambda: 0.0), RetryPolicy(config, rng=lambda: 1.0)
    # Ceilings 0.5, 1, 2, 2: the delay is between half the ceiling and the ceiling.
    assert [low.delay(a) for a in (1, 2, 3, 4)] == [0.25, 0.5, 1.0, 1.0]
    assert [high.delay(a) for a in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 2.0]
    assert low.delay(5) is None  # five attempts used: stop


def test_retry_after_is_honoured_up_to_the_cap() -> None:
    policy = RetryPolicy(RetryConfig(max_attempts=3, retry_after_cap_seconds=5.0))
    assert policy.delay(1, retry_after=3.0) == 3.0
    assert policy.delay(1, retry_after=0.0) == 0.0
    assert policy.delay(1, retry_after=6.0) is None  # longer than the cap: do not wait
    assert policy.delay(3, retry_after=1.0) is None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_probes_and_closes() -> None:
    clock, changes = Clock(), []
    b = CircuitBreaker(BreakerConfig(failure_threshold=3, cooldown_seconds=10.0),
                       on_change=changes.append, clock=clock)
    b.failure()
    b.failure()
    b.success()  # a success resets the count: failures must be consecutive
    for _ in range(3):
        assert b.allow()
        b.failure()
    assert b.state == "open" and not b.allow()
    assert b.retry_in() == 10.0
    clock.now += 10.0
    assert b.state == "half_open"
    assert b.allow()  # the probe
    assert not b.allow()  # only one probe at a time
    b.success()
    assert b.state == "closed" and b.allow()
    assert changes == ["open", "half_open", "closed"]


def test_failed_probe_reopens_and_a_released_probe_frees_the_slot() -> None:
    clock = Clock()
    b = CircuitBreaker(BreakerConfig(failure_threshold=1, cooldown_seconds=5.0), clock=clock)
    b.failure()
    clock.now += 5.0
    assert b.allow()
    b.failure()
    assert b.state == "open" and b.retry_in() == 5.0
    clock.now += 5.0
    assert b.allow()
    b.release()  # the probe's client left: no verdict, the next caller probes
    assert b.allow()


def test_breaker_state_reaches_the_metrics() -> None:
    metrics, clock = Metrics([]), Clock()
    b = CircuitBreaker(BreakerConfig(failure_threshold=1, cooldown_seconds=1.0),
                       on_change=lambda s: metrics.set_breaker("up", s), clock=clock)
    b.failure()

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"backend": "up", **labels})
    assert value("variations_gateway_backend_circuit_state", state="open") == 1
    assert value("variations_gateway_backend_up") == 0


async def test_limiter_bounds_the_queue_wait() -> None:
    limiter = ConcurrencyLimiter("up", limit=1, queue_timeout=0.05)
    async with limiter.slot():
        assert limiter.in_flight == 1
        with pytest.raises(BackendError) as info:
            async with limiter.slot():
                raise AssertionError("must not get a slot")
        assert info.value.status == 503 and info.value.code == "upstream_busy"
        assert info.value.headers["retry-after"] == "1"
        assert limiter.waiting == 0
    async with limiter.slot():  # the slot was released
        pass


async def test_limiter_queues_in_order() -> None:
    limiter = ConcurrencyLimiter("up", limit=2, queue_timeout=5.0)
    peak = 0
    release = asyncio.Event()

    async def work() -> None:
        nonlocal peak
        async with limiter.slot():
            peak = max(peak, limiter.in_flight)
            await release.wait()

    tasks = [asyncio.create_task(work()) for _ in range(5)]
    await eventually(lambda: limiter.waiting == 3, "three callers queued")
    assert limiter.in_flight == 2
    release.set()
    await asyncio.gather(*tasks)
    assert peak == 2 and limiter.in_flight == 0


async def test_unlimited_limiter_never_waits() -> None:
    limiter = ConcurrencyLimiter("up", limit=None, queue_timeout=0.0)
    async with limiter.slot(), limiter.slot():
        assert limiter.in_flight == 2
