"""Members on two replicas sharing a real Redis: a change reaches both within a second."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request
from redis_server import RedisServer
from support import ADMIN_TOKEN, GatewayProcess, base_config, eventually, start_gateway

from gateway.auth import REVOKED_KEY, Authenticator
from gateway.config import build_config
from gateway.errors import ApiError
from gateway.members import Members
from gateway.members.redis import VERSION, RedisMembers
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


class LosesOne:
    """A subscription that loses the next message once ``armed``: pub/sub delivers at
    most once (Redis drops what a subscriber's connection had not read when it breaks,
    https://redis.io/docs/latest/develop/interact/pubsub/#delivery-semantics). While
    it is lost, ``meanwhile`` runs: an admin listing the members on this replica."""

    def __init__(self, pubsub: Any, meanwhile: Callable[[], Awaitable[object]]) -> None:
        self._pubsub = pubsub
        self._meanwhile = meanwhile
        self.armed = False

    async def subscribe(self, *channels: str) -> None:
        await self._pubsub.subscribe(*channels)

    async def aclose(self) -> None:
        await self._pubsub.aclose()

    async def get_message(self, **kwargs: Any) -> Any:
        message = await self._pubsub.get_message(**kwargs)
        if message is None or not self.armed:
            return message
        self.armed = False
        await self._meanwhile()
        return None


async def test_a_lost_message_is_caught_up_after_an_admin_listing(redis_server: RedisServer,
                                                                  tmp_path: Path) -> None:
    """A listing (GET /admin/users) loads the store without rebuilding the authenticator's
    table: it must not count as the change seen, or a revoke whose message was lost
    would never reach this replica."""
    url = redis_server.url
    here = Members(RedisMembers(connect(url, 2.0), 2.0))
    there = Members(RedisMembers(connect(url, 2.0), 2.0))
    auth = Authenticator(build_config(base_config(tmp_path)), there)
    subscription = LosesOne(there.store.r.pubsub(), there.store.load)
    there.store.r.pubsub = lambda: subscription  # type: ignore[attr-defined]
    task = asyncio.create_task(there.store.watch(auth.refresh))
    try:
        made = await here.create("dave", {}, None)
        assert made.token is not None
        await eventually(lambda: _status(auth, made.token) == 200, "dave's token working",
                         3.0)
        subscription.armed = True
        await here.revoke("dave")
        await eventually(lambda: not subscription.armed, "the revoke's message lost", 3.0)
        await eventually(lambda: _status(auth, made.token) == 401,
                         "the revoke caught up by the version", 3.0)
    finally:
        task.cancel()
        await here.store.close()
        await there.store.close()


def _status(auth: Authenticator, token: str | None) -> int:
    request = make_mocked_request("GET", "/v1/usage",
                                  headers={"Authorization": f"Bearer {token}"})
    try:
        auth.member(request)
    except ApiError as exc:
        return exc.status
    return 200


async def test_seeding_the_same_config_again_bumps_no_version(redis_server: RedisServer,
                                                              tmp_path: Path) -> None:
    """Every replica seeds at start and reload: an unchanged config must not make every
    replica reload its members."""
    store = RedisMembers(connect(redis_server.url, 2.0), 2.0)
    config = build_config(base_config(tmp_path))
    try:
        await Members(store, clock=lambda: 1_000.0).seed(config)
        version = await store.r.get(VERSION)
        await Members(store, clock=lambda: 2_000.0).seed(config)  # a later start
        assert await store.r.get(VERSION) == version
    finally:
        await store.close()
