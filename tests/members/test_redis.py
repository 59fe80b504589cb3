"""Members on two replicas sharing a real Redis: a change reaches both within a second."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis_server import RedisServer
from support import ADMIN_TOKEN, GatewayProcess, base_config, eventually, start_gateway

from gateway.auth import REVOKED_KEY
from gateway.members import Members
from gateway.members.redis import RedisMembers
from gateway.redis.client import connect

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PROPAGATION_S = 1.0  # the promise: every replica within one second


def replica(tmp: Path, name: str, redis_url: str) -> GatewayProcess:
    own = tmp / name
    raw = base_config(own, state={"kind": "redis", "redis_url": redis_url,
                                  "timeout_seconds": 5.0, "path": str(own / "state.sqlite3")},
                      cache={"dir": str(tmp / "shared" / "cache")},
                      images={"dir": str(tmp / "shared" / "images")})
    return start_gateway(raw, own)


@pytest.fixture
def two_replicas(redis_server: RedisServer, tmp_path: Path):  # type: ignore[no-untyped-def]
    gateways = [replica(tmp_path, name, redis_server.url) for name in ("a", "b")]
    yield gateways
    for g in gateways:
        g.stop()


async def admin(session: aiohttp.ClientSession, method: str, url: str,
                body: object = None) -> dict[str, Any]:
    async with session.request(method, url, headers=ADMIN, json=body) as r:
        assert r.status in (200, 201), await r.text()
        return await r.json()


async def statuses(session: aiohttp.ClientSession, gateways: list[GatewayProcess],
                   token: str) -> list[tuple[int, str]]:
    out = []
    for g in gateways:
        async with session.get(g.url + "/v1/usage",
                               headers={"Authorization": f"Bearer {token}"}) as r:
            body = await r.json()
            out.append((r.status, body["error"]["message"] if r.status != 200 else ""))
    return out


async def test_rotate_and_revoke_reach_both_replicas_within_a_second(
        two_replicas: list[GatewayProcess]) -> None:
    a, b = two_replicas
    async with aiohttp.ClientSession() as session:
        made = await admin(session, "POST", a.url + "/admin/users", {"name": "carol"})
        old = made["token"]
        await eventually(lambda: _all(session, two_replicas, old, 200),
                         "the new member's token working on both replicas", PROPAGATION_S)
        rotated = await admin(session, "POST", b.url + "/admin/users/carol/tokens")
        new = rotated["token"]
        await eventually(lambda: _all(session, two_replicas, new, 200),
                         "the rotated token working on both replicas", PROPAGATION_S)
        assert await _all(session, two_replicas, old, 200)  # no gap: the old one still works

        await admin(session, "DELETE", a.url + f"/admin/users/carol/tokens/{made['token_id']}")
        revoked_at = time.monotonic()
        await eventually(lambda: _all(session, two_replicas, old, 401),
                         "the revoked token refused on both replicas", PROPAGATION_S)
        print(f"\nrevoke reached both replicas in {time.monotonic() - revoked_at:.3f} s")
        assert {m for _, m in await statuses(session, two_replicas, old)} == {REVOKED_KEY}
        assert await _all(session, two_replicas, new, 200)

        await admin(session, "DELETE", b.url + "/admin/users/carol/tokens")
        await eventually(lambda: _all(session, two_replicas, new, 401),
                         "revoke-all refused on both replicas", PROPAGATION_S)
        listed = await admin(session, "GET", b.url + "/admin/users")
        assert {m["name"]: len(m["tokens"]) for m in listed["data"]} == {
            "alice": 1, "bob": 1, "carol": 0}


async def _all(session: aiohttp.ClientSession, gateways: list[GatewayProcess], token: str,
               status: int) -> bool:
    return all(s == status for s, _ in await statuses(session, gateways, token))


async def test_a_missed_message_is_caught_up_by_the_version(redis_server: RedisServer
                                                            ) -> None:
    """Pub/sub delivers at most once: a watcher that missed the message still reloads
    within a second, from the version counter."""
    url = redis_server.url
    here = Members(RedisMembers(connect(url, 2.0), 2.0))
    there = RedisMembers(connect(url, 2.0), 2.0)
    try:
        await there.load()
        seen = []

        async def changed() -> None:
            seen.append((await there.load()).members.keys())

        def no_pubsub() -> None:
            raise NotImplementedError  # as redis-py's asyncio cluster client

        # The watcher is told nothing by pub/sub.
        there.r.pubsub = no_pubsub
        task = asyncio.create_task(there.watch(changed))
        await eventually(lambda: seen, "the watcher's first load")
        await here.create("dave", {}, None)
        await eventually(lambda: "dave" in seen[-1], "the change seen by its version", 3.0)
        task.cancel()
    finally:
        await here.store.close()
        await there.close()
