"""Acceptance for scale-out (issue 7): a real Redis and two real gateway processes.

Quotas stay exact across replicas, a result cached by one is a hit on the other, a URL
minted by one downloads from the other, and a Redis killed mid-burst costs 503s (never
a hang, never an image past the limit) and comes back without restarting a gateway.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis_server import RedisServer, require_redis_server
from support import (
    ADMIN_TOKEN,
    GatewayProcess,
    auth,
    base_config,
    eventually,
    png_bytes,
    start_gateway,
)

pytestmark = pytest.mark.slow

CLIENT_TIMEOUT = 20.0  # far above what any request may take: a hang shows as a failure
NO_STORE = {"Cache-Control": "no-store"}


def replica(tmp: Path, name: str, redis_url: str, state_timeout: float) -> GatewayProcess:
    """One replica: its own audit and scratch state, Redis and the byte dirs shared."""
    own = tmp / name
    raw = base_config(
        own,
        state={"kind": "redis", "redis_url": redis_url, "timeout_seconds": state_timeout,
               "path": str(own / "state.sqlite3")},
        cache={"dir": str(tmp / "shared" / "cache")},
        images={"dir": str(tmp / "shared" / "images")},
        quota_defaults={"images_per_day": 100, "images_per_month": None,
                        "requests_per_minute": None, "max_concurrent": None},
        abuse={"distinct_end_users": 4, "window_seconds": 600})
    return start_gateway(raw, own)


def form(image: bytes, response_format: str = "url", end_user: str | None = None
         ) -> aiohttp.FormData:
    f = aiohttp.FormData()
    if end_user is not None:
        f.add_field("user", end_user)
    f.add_field("image", image, filename="layer.png", content_type="image/png")
    f.add_field("n", "1")
    f.add_field("size", "256x256")
    f.add_field("response_format", response_format)
    return f


async def post(session: aiohttp.ClientSession, base: str, image: bytes, user: str = "alice",
               headers: dict[str, str] | None = None, end_user: str | None = None
               ) -> tuple[int, dict[str, Any], float, dict[str, str]]:
    started = time.monotonic()
    async with session.post(base + "/v1/images/variations",
                            data=form(image, end_user=end_user),
                            headers={**auth(user), **(headers or {})},
                            timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)) as resp:
        body = await resp.json()
        return resp.status, body, time.monotonic() - started, dict(resp.headers)


async def images_today(session: aiohttp.ClientSession, base: str, user: str) -> int:
    async with session.get(base + "/admin/usage",
                           headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
        assert resp.status == 200, await resp.text()
        return int((await resp.json())["users"][user]["images_today"])


@pytest.fixture
def two_replicas(redis_server: RedisServer, tmp_path: Path):  # type: ignore[no-untyped-def]
    # A generous state timeout: this test is about exactness on a busy 2-core box.
    gateways = [replica(tmp_path, name, redis_server.url, 5.0) for name in ("a", "b")]
    yield gateways
    for g in gateways:
        g.stop()


async def test_quota_exact_hit_and_url_across_replicas(two_replicas: list[GatewayProcess]
                                                       ) -> None:
    a, b = two_replicas
    image = png_bytes(32)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        # 400 concurrent n=1 requests for one user, half on each replica, none cacheable.
        answers = await asyncio.gather(*(
            post(session, (a, b)[i % 2].url, image, headers=NO_STORE) for i in range(400)))
        statuses = Counter(status for status, *_ in answers)
        admitted_by = Counter(i % 2 for i, (s, *_) in enumerate(answers) if s == 200)
        print(f"\n400 concurrent over 2 replicas: {dict(statuses)}; 200s by replica "
              f"{dict(admitted_by)}; slowest {max(t for *_, t, _ in answers):.2f}s")
        assert statuses == {200: 100, 429: 300}
        assert {body["error"]["code"] for s, body, *_ in answers if s == 429} == {
            "quota_exceeded"}
        assert await images_today(session, a.url, "alice") == 100
        assert await images_today(session, b.url, "alice") == 100
        status, body, *_ = await post(session, b.url, png_bytes(32, seed=9))
        assert status == 429 and body["error"]["code"] == "quota_exceeded"

        # A result generated through A is a HIT on B; its URL from A downloads from B.
        fresh = png_bytes(48, seed=3)
        status, first, _, headers = await post(session, a.url, fresh, user="bob")
        assert status == 200 and headers["X-Cache"] == "MISS"
        status, _, _, headers = await post(session, b.url, fresh, user="bob")
        assert status == 200 and headers["X-Cache"] == "HIT", headers
        url_from_a = first["data"][0]["url"]
        assert url_from_a.startswith(a.url)
        async with session.get(b.url + url_from_a[len(a.url):]) as resp:
            assert resp.status == 200
            on_b = await resp.read()
        async with session.get(url_from_a) as resp:
            assert await resp.read() == on_b
        assert on_b.startswith(b"\x89PNG")
        assert await images_today(session, b.url, "bob") == 1  # the HIT cost nothing


async def sample(session: aiohttp.ClientSession, base: str, name: str,
                 labels: dict[str, str]) -> float:
    async with session.get(base + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    (value,) = [s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == name and s.labels == labels]
    return value


async def budget_share(session: aiohttp.ClientSession, base: str, user: str) -> float:
    return await sample(session, base, "variations_gateway_user_budget_used_ratio",
                        {"user": user})


async def test_abuse_window_spans_the_replicas(two_replicas: list[GatewayProcess]) -> None:
    """Four distinct end users behind alice's token, two through each replica: neither
    replica alone reaches the threshold of 4, together they raise it once."""
    a, b = two_replicas
    image = png_bytes(34)

    async def raised() -> float:
        return sum([await sample(session, g.url, "variations_gateway_abuse_suspected_total",
                                 {"reason": "many_end_users", "user": "alice"})
                    for g in (a, b)])

    async with aiohttp.ClientSession() as session:
        for i in range(6):
            status, *_ = await post(session, (a, b)[i % 2].url, image, end_user=f"e{i % 4}")
            assert status == 200

        async def was_raised() -> bool:  # reported after the answer
            return await raised() >= 1

        await eventually(was_raised, "abuse_suspected raised", 30, interval_s=0.1)
        await post(session, a.url, image, end_user="e9")
        await post(session, b.url, image, end_user="e8")
        assert await raised() == 1


async def test_budget_gauge_follows_usage_through_the_other_replica(
        two_replicas: list[GatewayProcess]) -> None:
    """The budget alert takes max by (user) over replicas: a replica the member stopped
    using must show the member's current share within seconds, not a stale one."""
    a, b = two_replicas
    async with aiohttp.ClientSession() as session:
        status, *_ = await post(session, a.url, png_bytes(33, seed=1), headers=NO_STORE)
        assert status == 200
        assert await budget_share(session, a.url, "alice") == pytest.approx(0.01)
        for seed in range(2, 6):
            status, *_ = await post(session, b.url, png_bytes(33, seed=seed),
                                    headers=NO_STORE)
            assert status == 200
        assert await budget_share(session, b.url, "alice") == pytest.approx(0.05)
        shares: list[float] = []

        async def caught_up() -> bool:
            shares.append(await budget_share(session, a.url, "alice"))
            return shares[-1] == pytest.approx(0.05)

        await eventually(caught_up, lambda: f"replica a still shows {shares[-1:]}",
                         30, interval_s=0.2)  # a few of the 5 s refreshes
        assert await budget_share(session, a.url, "bob") == 0.0  # every member has a series


async def test_redis_killed_mid_burst_then_back(tmp_path: Path) -> None:
    require_redis_server()
    server = RedisServer(tmp_path / "redis", persist=True)
    server.start()
    gateways = [replica(tmp_path, name, server.url, 1.0) for name in ("a", "b")]
    a, b = gateways
    image = png_bytes(32)
    done: list[tuple[int, str | None, float]] = []
    some_done, some_refused = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def one(i: int) -> None:
                status, body, took, headers = await post(session, gateways[i % 2].url, image,
                                                         headers=NO_STORE)
                code = body.get("error", {}).get("code") if status != 200 else None
                if status == 503:
                    assert code == "state_unavailable" and headers.get("Retry-After")
                    if sum(1 for s, *_ in done if s == 503) >= 40:
                        some_refused.set()
                done.append((status, code, took))
                if len(done) >= 20:
                    some_done.set()

            async def outage() -> tuple[float, float]:
                await some_done.wait()
                killed = time.monotonic()
                await loop.run_in_executor(None, server.kill)
                await asyncio.wait([asyncio.ensure_future(some_refused.wait()), burst],
                                   return_when=asyncio.FIRST_COMPLETED)
                await loop.run_in_executor(None, server.start)  # same port, same AOF
                return killed, time.monotonic()

            burst = asyncio.ensure_future(asyncio.gather(*(one(i) for i in range(300))))
            killed, restarted = await outage()
            await burst  # every request answered within CLIENT_TIMEOUT, none hung

            # Service resumes on both replicas without restarting them.
            recovered: dict[str, float] = {}

            async def both_recovered() -> bool:
                for g in gateways:
                    if g.url not in recovered:
                        status, *_ = await post(session, g.url, png_bytes(32, seed=5),
                                                user="bob", headers=NO_STORE)
                        if status == 200:
                            recovered[g.url] = time.monotonic() - restarted
                return len(recovered) == 2

            await eventually(both_recovered, lambda: f"recovery, so far: {recovered}", 30,
                             interval_s=0)
            assert all(g.proc.poll() is None for g in gateways)

            # Fill alice's day. Reservations the outage left unsettled are refunded once
            # Redis is back, so the day fills to exactly 100 and never past it.
            ok = sum(1 for s, *_ in done if s == 200)
            ledger, sent = 0, 0

            async def full_else_one_more() -> bool:
                nonlocal ok, ledger, sent
                if (ledger := await images_today(session, a.url, "alice")) >= 100:
                    return True
                status, body, *_ = await post(session, gateways[sent % 2].url, image,
                                              headers=NO_STORE)
                sent += 1
                if status == 200:
                    ok += 1
                else:
                    assert status == 429 and body["error"]["code"] == "quota_exceeded"
                    await asyncio.sleep(0.1)  # refunds are retried with backoff
                return False

            await eventually(full_else_one_more, lambda: f"held quota back (ledger {ledger})", 30,
                             interval_s=0)
            status, body, *_ = await post(session, a.url, image, headers=NO_STORE)
            assert status == 429 and body["error"]["code"] == "quota_exceeded"
            assert await images_today(session, b.url, "alice") == 100
            statuses = Counter(s for s, *_ in done)
            print(f"\noutage burst of 300: {dict(statuses)}; slowest answer "
                  f"{max(t for *_, t in done):.2f}s; Redis down {restarted - killed:.2f}s; "
                  f"recovered after restart in {max(recovered.values()):.2f}s; "
                  f"200s total {ok}, ledger {ledger}")
            assert statuses[503] > 0 and set(statuses) <= {200, 429, 503}
            assert ok <= ledger == 100  # charged for every image delivered, never past
    finally:
        for g in gateways:
            g.stop()
        server.stop()
