"""Routing across real HTTP backends: fallback, circuit breaker, limiter, retry-after.

Two fake OpenAI-compatible upstreams, ``a`` then ``b`` in the route. The breaker's
clock is replaced by a settable one, so "after the cool-down" needs no sleeping.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from fakes_upstreams import OpenAIVariationsFake
from instrumented_backend import vary
from support import eventually, png_bytes
from upstream_cases import FAST, GATEWAY_UPSTREAM, KEY, backend_entry, serve_fake

from gateway.config import build_config
from gateway.generation import VariationRequest
from gateway.keys import LIVE, METRICS
from gateway.metrics import Metrics
from gateway.router import Router


@dataclass
class Pair:
    client: TestClient
    a: OpenAIVariationsFake
    b: OpenAIVariationsFake
    now: list[float]
    seed: int = 0

    async def vary(self, **form: Any) -> Any:
        self.seed += 1  # a new image each time: no cache hits
        return await asyncio.wait_for(vary(self.client, png_bytes(64, seed=self.seed),
                                           **form), 20)

    def metric(self, name: str, **labels: str) -> float:
        value = self.client.app[METRICS].registry.get_sample_value(
            f"variations_gateway_{name}", labels)
        return value or 0.0

    async def readyz(self) -> dict[str, Any]:
        async with self.client.get("/readyz") as r:
            assert r.status == 200
            return (await r.json())["checks"]["backends"]


Make = Callable[..., Awaitable[Pair]]


@pytest.fixture
async def pair(gateway_client: Any) -> AsyncIterator[Make]:
    servers: list[TestServer] = []
    fakes: list[OpenAIVariationsFake] = []

    async def make(route: tuple[str, ...] = ("a", "b"), **a_settings: Any) -> Pair:
        a, b = OpenAIVariationsFake(KEY), OpenAIVariationsFake(KEY)
        entries = []
        for name, fake, extra in (("a", a, a_settings), ("b", b, {})):
            server, url = await serve_fake(fake)
            servers.append(server)
            fakes.append(fake)
            entries.append(backend_entry("openai", url, name=name, **GATEWAY_UPSTREAM, **extra))
        client = await gateway_client(backends=entries, route=list(route))
        now = [1000.0]
        client.app[LIVE].current.router.guard("a").breaker.clock = lambda: now[0]
        return Pair(client, a, b, now)

    yield make
    for fake in fakes:
        fake.release()
    for server in servers:
        await server.close()


BREAKER = {"breaker": {"failure_threshold": 2, "cooldown_seconds": 30.0},
           "retry": {**FAST["retry"], "max_attempts": 1}}


async def test_open_breaker_skips_the_backend_and_one_probe_closes_it(pair: Make) -> None:
    p = await pair(**BREAKER)
    p.a.inject("500")
    for expected_a_calls in (1, 2):  # below and at the threshold: a is tried, b answers
        answer = await p.vary()
        assert answer.status == 200, answer.body
        assert len(p.a.calls()) == expected_a_calls
    assert p.metric("backend_circuit_state", backend="a", state="open") == 1
    assert p.metric("backend_up", backend="a") == 0

    answer = await p.vary()  # open: straight to the fallback, a untouched
    assert answer.status == 200
    assert len(p.a.calls()) == 2 and len(p.b.calls()) == 3
    assert p.metric("backend_errors_total", backend="a", kind="circuit_open") == 1
    checks = await p.readyz()  # the gateway stays ready and shows the state
    assert checks["a"]["breaker"] == "open" and checks["a"]["retry_in_seconds"] == 30.0
    assert checks["b"]["breaker"] == "closed"

    p.a.inject(None)  # a recovers; the cool-down passes
    p.now[0] += 30.0
    assert (await p.readyz())["a"]["breaker"] == "half_open"
    answer = await p.vary()
    assert answer.status == 200
    assert len(p.a.calls()) == 3 and len(p.b.calls()) == 3  # one probe, served by a
    assert (await p.readyz())["a"]["breaker"] == "closed"
    assert p.metric("backend_circuit_state", backend="a", state="closed") == 1
    assert p.metric("backend_up", backend="a") == 1


async def test_failed_probe_opens_again(pair: Make) -> None:
    p = await pair(**BREAKER)
    p.a.inject("503")
    p.a.retry_after = "0"
    for _ in range(2):
        assert (await p.vary()).status == 200
    p.now[0] += 30.0
    assert (await p.vary()).status == 200  # the probe fails, b answers
    assert len(p.a.calls()) == 3
    assert (await p.readyz())["a"]["breaker"] == "open"
    assert (await p.vary()).status == 200
    assert len(p.a.calls()) == 3  # open again: not touched


async def test_open_breaker_without_fallback_is_a_truthful_503(pair: Make) -> None:
    p = await pair(route=("a",), **BREAKER)
    p.a.inject("500")
    for _ in range(2):
        assert (await p.vary()).status == 502
    p.now[0] += 12.5
    answer = await p.vary()
    assert answer.status == 503
    assert answer.body["error"]["code"] == "upstream_unavailable"
    assert answer.headers["retry-after"] == "18"  # what is left of the 30 s cool-down
    assert len(p.a.calls()) == 2


async def test_non_retryable_errors_do_not_fall_back(pair: Make) -> None:
    p = await pair()
    p.a.inject("content_policy")
    answer = await p.vary()
    assert answer.status == 400
    assert answer.body["error"]["code"] == "content_policy_violation"
    assert answer.headers["x-should-retry"] == "false"
    assert len(p.b.calls()) == 0
    assert (await p.readyz())["a"]["consecutive_failures"] == 0  # the input's fault


async def test_auth_failure_falls_back_and_is_not_retried(pair: Make) -> None:
    p = await pair()
    p.a.inject("auth")
    answer = await p.vary()
    assert answer.status == 200
    assert len(p.a.calls()) == 1 and len(p.b.calls()) == 1


async def test_retry_after_ms_wins_and_a_long_retry_after_is_not_waited(pair: Make) -> None:
    p = await pair(route=("a",))
    p.a.inject("503")
    p.a.retry_after, p.a.retry_after_ms = "30", "20"
    answer = await p.vary()
    assert answer.status == 503 and len(p.a.calls()) == 3  # 20 ms waits, 3 attempts
    assert p.metric("backend_retries_total", backend="a") == 2

    p.a.retry_after_ms = None  # 30 s is over the 5 s cap: answer now, truthfully
    answer = await p.vary()
    assert answer.status == 503 and len(p.a.calls()) == 4
    assert answer.headers["retry-after"] == "30"


async def test_concurrency_limit_queues_then_answers_busy(pair: Make) -> None:
    p = await pair(route=("a",), max_concurrent=1, queue_timeout_seconds=0.2)
    p.a.gate.clear()
    first = asyncio.create_task(p.vary())
    await eventually(lambda: p.a.arrived == 1, "the first call held at the upstream")
    second = await p.vary()
    assert second.status == 503 and second.body["error"]["code"] == "upstream_busy"
    assert second.headers["retry-after"] == "1"
    assert p.a.arrived == 1  # the second never reached the upstream
    p.a.gate.set()
    assert (await first).status == 200
    assert (await p.vary()).status == 200


async def test_busy_backend_falls_back(pair: Make) -> None:
    p = await pair(max_concurrent=1, queue_timeout_seconds=0.05)
    p.a.gate.clear()
    first = asyncio.create_task(p.vary())
    await eventually(lambda: p.a.arrived == 1, "the first call held at the upstream")
    assert (await p.vary()).status == 200
    assert len(p.b.calls()) == 1
    p.a.gate.set()
    assert (await first).status == 200


async def test_backend_metrics(pair: Make) -> None:
    p = await pair(route=("a",))
    p.a.inject("500", times=1)
    assert (await p.vary()).status == 200  # one failure, one retry, then success
    assert p.metric("backend_errors_total", backend="a", kind="http_5xx") == 1
    assert p.metric("backend_retries_total", backend="a") == 1
    assert p.metric("backend_request_duration_seconds_count", backend="a") == 1
    assert p.metric("images_generated_total", backend="a", size="256x256") == 1


@pytest.mark.parametrize("fault", ["corrupt_idat", "deep_json"])
async def test_unusable_answer_counts_against_the_breaker_and_falls_back(
        pair: Make, fault: str) -> None:
    """An answer that cannot be used is the upstream's failure: b answers, a's breaker
    counts it, and a is not asked again for the same (paid) call."""
    p = await pair(**BREAKER)
    p.a.inject(fault)
    answer = await p.vary()
    assert answer.status == 200, answer.body
    assert len(p.a.calls()) == 1 and len(p.b.calls()) == 1
    assert p.metric("backend_errors_total", backend="a", kind="bad_response") == 1
    assert p.metric("images_generated_total", backend="b", size="256x256") == 1
    assert (await p.readyz())["a"]["consecutive_failures"] == 1


def choke_after_the_call(p: Pair) -> None:
    """``a`` calls its upstream (which is paid), then a parser raises what no backend
    maps: struct.error stands for any parser gap not found yet."""
    backend = p.client.app[LIVE].current.router.backends["a"]
    original = backend.generate

    async def unmapped(request: VariationRequest) -> list[bytes]:
        await original(request)
        raise struct.error("unpack requires a buffer of 8 bytes")

    backend.generate = unmapped  # type: ignore[method-assign]


async def test_an_exception_no_backend_mapped_is_a_502_counted_by_the_breaker(
        pair: Make) -> None:
    """Not a 500 with x-should-retry: true, which the SDK retries, paying each time."""
    p = await pair(route=("a",), **BREAKER)
    choke_after_the_call(p)
    answer = await p.vary()
    assert answer.status == 502, answer.body
    assert answer.body["error"]["code"] == "upstream_bad_response"
    assert "unpack" not in answer.body["error"]["message"]
    assert answer.headers.get("x-should-retry") != "true"
    assert len(p.a.calls()) == 1  # not retried: the upstream was paid for that answer
    assert p.metric("backend_errors_total", backend="a", kind="unexpected") == 1
    assert (await p.readyz())["a"]["consecutive_failures"] == 1
    assert (await p.vary()).status == 502
    assert p.metric("backend_circuit_state", backend="a", state="open") == 1


async def test_an_exception_no_backend_mapped_falls_back(pair: Make) -> None:
    p = await pair(**BREAKER)
    choke_after_the_call(p)
    answer = await p.vary()
    assert answer.status == 200, answer.body
    assert len(p.a.calls()) == 1 and len(p.b.calls()) == 1
    assert p.metric("images_generated_total", backend="b", size="256x256") == 1


def test_report_breakers_shows_half_open_once_the_cool_down_passed() -> None:
    """open -> half_open is only the clock passing; without traffic nothing reports it,
    so the periodic re-report must."""
    entry = {"kind": "openai", **GATEWAY_UPSTREAM, "base_url": "http://127.0.0.1:9/v1", **BREAKER}
    config = build_config({"backends": [{"name": "a", **entry}, {"name": "b", **entry}],
                           "route": ["a", "b"]})
    metrics = Metrics([])
    router = Router(config, metrics)
    now = [1000.0]
    breaker = router.guard("a").breaker
    breaker.clock = lambda: now[0]
    for _ in range(2):
        breaker.failure()

    def state(value: str) -> float | None:
        return metrics.registry.get_sample_value(
            "variations_gateway_backend_circuit_state", {"backend": "a", "state": value})

    assert state("open") == 1
    router.report_breakers()
    assert state("open") == 1  # still cooling down
    now[0] += 30.0
    assert state("open") == 1  # nothing has told the metrics yet
    router.report_breakers()
    assert state("half_open") == 1 and state("open") == 0
    assert metrics.registry.get_sample_value(
        "variations_gateway_backend_circuit_state",
        {"backend": "b", "state": "closed"}) == 1
