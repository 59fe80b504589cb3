"""The Redis state against a real redis-server: each store is built twice, as two
replicas would build it, so every check-and-take is exercised across clients."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from redis_server import RedisServer
from support import eventually

from gateway.abuse import Suspicion
from gateway.abuse import redis as abuse_redis
from gateway.abuse.redis import KEYS as ABUSE_KEYS
from gateway.abuse.redis import RedisAbuseMonitor
from gateway.auth import Principal
from gateway.cache import CacheResult, Evicted, Fresh, ResultCache
from gateway.cache.redis import RedisCacheIndex
from gateway.config import AbuseConfig, QuotaLimits
from gateway.errors import StorageUnavailable
from gateway.images.blobs import BlobStore
from gateway.images.redis import BLOBS, IMAGES, RedisBlobStore, RedisImageStore, shared_signing_key
from gateway.quota import QuotaRejected, Reservation
from gateway.quota.redis import RedisQuota, UserKeys
from gateway.redis.client import RETRY_AFTER_SECONDS, connect, connect_sync

TIMEOUT = 1.0


def who(name: str = "alice", **limits: object) -> Principal:
    base: dict[str, object] = {"images_per_day": None, "requests_per_minute": None,
                               "max_concurrent": None}
    return Principal(name, QuotaLimits(**{**base, **limits}), True)  # type: ignore[arg-type]


def quota(server: RedisServer, lease: float = 600.0) -> RedisQuota:
    return RedisQuota(connect(server.url, TIMEOUT), TIMEOUT, lease_seconds=lease)


def index(server: RedisServer) -> RedisCacheIndex:
    return RedisCacheIndex(connect(server.url, TIMEOUT), TIMEOUT)


async def test_reservations_are_exact_across_replicas(redis_server: RedisServer) -> None:
    replicas = [quota(redis_server), quota(redis_server)]
    p = who(images_per_day=50, budget_usd_per_month=10.0)

    async def one(i: int) -> Reservation | None:
        try:
            return await replicas[i % 2].reserve(p, 1, 0.02, "256x256")  # type: ignore[return-value]
        except QuotaRejected as exc:
            assert exc.code == "quota_exceeded" and exc.limit == "images_per_day"
            return None

    got = await asyncio.gather(*(one(i) for i in range(200)))
    held = [r for r in got if r is not None]
    assert len(held) == 50
    for i, r in enumerate(held):
        if i % 2:
            await replicas[i % 2].commit(r, 1, 0.02)
        else:
            await replicas[i % 2].refund(r)
    day = {s.name: s for s in await replicas[0].usage(p)}["images_per_day"]
    assert (day.used, day.remaining) == (25, 25)
    assert (await replicas[1].all_usage()) == {}  # count_request feeds all_usage
    await replicas[0].count_request(p, cache_hit=False)
    row = (await replicas[1].all_usage())["alice"]
    assert row["images_today"] == 25 and row["requests_today"] == 1
    assert row["spend_usd_this_month"] == pytest.approx(0.5)
    # A second commit or a refund after commit changes nothing.
    await replicas[1].commit(held[1], 1, 0.02)
    await replicas[0].refund(held[1])
    assert {s.name: s for s in await replicas[1].usage(p)}["images_per_day"].used == 25
    for q in replicas:
        await q.close()


async def test_budget_is_held_by_reservations(redis_server: RedisServer) -> None:
    q = quota(redis_server)
    p = who(budget_usd_per_month=0.05)
    first = await q.reserve(p, 2, 0.04, "256x256")
    with pytest.raises(QuotaRejected) as exc:
        await q.reserve(p, 1, 0.02, "256x256")
    assert exc.value.limit == "budget_usd_per_month"
    await q.refund(first)
    await q.reserve(p, 1, 0.02, "256x256")
    await q.close()


async def test_a_dead_replicas_reservation_expires(redis_server: RedisServer) -> None:
    """A reservation never committed nor refunded (its replica crashed) frees itself."""
    crashed, alive = quota(redis_server, lease=0.5), quota(redis_server)
    p = who(images_per_day=5)
    await crashed.reserve(p, 5, 0.0, "256x256")
    await crashed.close()
    with pytest.raises(QuotaRejected):
        await alive.reserve(p, 1, 0.0, "256x256")

    async def reserved() -> bool:
        try:
            await alive.reserve(p, 5, 0.0, "256x256")
        except QuotaRejected:
            return False
        return True

    await eventually(reserved, "the dead replica's lease to expire", interval_s=0.05)
    await alive.close()


async def test_sliding_window_and_concurrency(redis_server: RedisServer) -> None:
    a, b = quota(redis_server), quota(redis_server)
    p = who(requests_per_minute=3)
    for q in (a, b, a):
        async with q.admit(p):
            pass
    with pytest.raises(QuotaRejected) as exc:
        async with b.admit(p):
            pass
    assert exc.value.limit == "requests_per_minute" and exc.value.status == 429
    assert 1 <= int(exc.value.headers["retry-after"]) <= 60

    c = who("bob", max_concurrent=2)
    async with a.admit(c), b.admit(c):
        with pytest.raises(QuotaRejected) as exc:
            async with a.admit(c):
                pass
        assert exc.value.limit == "max_concurrent"
        assert {s.name: s for s in await b.usage(c)}["max_concurrent"].used == 2
    async with b.admit(c):  # both slots were released on exit
        pass
    await a.close()
    await b.close()


async def test_blocks_are_shared(redis_server: RedisServer) -> None:
    a, b = quota(redis_server), quota(redis_server)
    await a.set_blocked("alice", True)
    assert await b.is_blocked("alice") and not await b.is_blocked("bob")
    with pytest.raises(QuotaRejected) as exc:
        async with b.admit(who()):
            pass
    assert exc.value.status == 403 and exc.value.code == "user_blocked"
    await b.set_blocked("alice", False)
    async with a.admit(who()):
        pass
    await a.close()
    await b.close()


async def test_fails_closed_then_recovers_on_its_own(redis_server: RedisServer) -> None:
    q = quota(redis_server)
    p = who(images_per_day=3)
    r = await q.reserve(p, 1, 0.0, "256x256")
    await q.commit(r, 1, 0.0)
    redis_server.kill()
    started = time.monotonic()
    with pytest.raises(StorageUnavailable) as exc:
        await q.reserve(p, 1, 0.0, "256x256")
    assert time.monotonic() - started < 5 * TIMEOUT  # bounded, not hung
    assert exc.value.status == 503 and exc.value.code == "state_unavailable"
    assert exc.value.headers["retry-after"] == str(RETRY_AFTER_SECONDS)
    with pytest.raises(StorageUnavailable):
        async with q.admit(p):
            pass
    redis_server.start()  # same port, empty (no persistence): scripts must reload
    r = await q.reserve(p, 3, 0.0, "256x256")  # the same client, no restart
    await q.commit(r, 3, 0.0)
    with pytest.raises(QuotaRejected):
        await q.reserve(p, 1, 0.0, "256x256")
    await q.close()


async def test_cache_index_pools_lru_ttl_and_refcounts(redis_server: RedisServer) -> None:
    a, b = index(redis_server), index(redis_server)
    await a.append("k1", [("s1", 10), ("s2", 10)], 100.0)
    await b.append("k1", [("s3", 10)], 101.0)
    await b.append("k2", [("s1", 10)], 102.0)  # s1 shared by two pools
    await a.append("k3", [("s4", 10)], 103.0)
    assert await b.pool("k1", 104.0) == [("s1", 10), ("s2", 10), ("s3", 10)]
    assert await a.stats() == (3, 50)
    # k2 is now least recently used: evicting to 40 bytes drops it; s1 is still in k1.
    assert (await b.evict(40, 10**6, 105.0)).orphans == []
    assert await a.pool("k2", 106.0) == []
    assert await a.stats() == (2, 40)
    # Dropping k1 by TTL (created at 100) orphans s1, s2, s3; k3 (103) stays.
    assert sorted((await a.evict(10**6, 4, 105.0)).orphans) == ["s1", "s2", "s3"]
    assert await b.stats() == (1, 10)
    # Keys in use are skipped by TTL and by LRU; the others still go.
    await a.append("k4", [("s5", 10)], 106.0)
    await a.append("k5", [("s6", 10)], 107.0)
    assert await a.evict(0, 1, 200.0, keep=frozenset({"k3", "k4"})) == Evicted(
        ["s6"], frozenset({"k3", "k4"}))
    assert await b.stats() == (2, 20)
    assert await b.evict(0, 10**6, 200.0, keep=frozenset({"k4"})) == Evicted(
        ["s4"], frozenset({"k4"}))
    assert await a.stats() == (1, 10)
    # A pool whose file is gone is forgotten however fresh, if it still is what was seen.
    await a.append("k6", [("s7", 10), ("s8", 10)], 300.0)
    assert await b.forget("k6", [("s8", 10)]) == []  # changed since: kept
    assert await b.forget("gone", [("s8", 10)]) == []
    assert sorted(await b.forget("k6", [("s7", 10)])) == ["s7", "s8"]
    assert await a.pool("k6", 302.0) == [] and await a.stats() == (1, 10)
    await a.close()
    await b.close()


async def test_flight_lock_wakes_waiters_on_release(redis_server: RedisServer) -> None:
    a, b = index(redis_server), index(redis_server)
    assert await a.acquire_flight("k", 30)
    assert not await b.acquire_flight("k", 30)
    waiter = asyncio.create_task(b.wait_flight("k", 60))
    await asyncio.sleep(0)
    assert not waiter.done()
    await a.release_flight("k")
    await asyncio.wait_for(waiter, 10)  # woken by the release, long before 60 s
    assert await b.acquire_flight("k", 0.2)
    # An owner that dies never releases: its lock expires and waiters go on.
    await asyncio.wait_for(a.wait_flight("k", 60), 10)
    # ... and no waker is left behind for a release that will never be published.
    assert a._wakers == {} and b._wakers == {}
    await a.close()
    await b.close()


async def test_single_flight_across_replicas(redis_server: RedisServer, tmp_path: Path) -> None:
    """Identical misses on two replicas sharing a blob dir cause one backend call."""
    caches = [ResultCache(index(redis_server), BlobStore(tmp_path / "blobs"), enabled=True,
                          max_bytes=10**9, ttl_seconds=3600, flight_ttl_seconds=30)
              for _ in range(2)]
    calls: list[tuple[int, int]] = []
    release, started = asyncio.Event(), asyncio.Event()

    async def generate(count: int, offset: int) -> Fresh:
        calls.append((count, offset))
        started.set()
        await release.wait()
        return Fresh([b"png-%d" % (offset + i) for i in range(count)])

    async def serve(cache: ResultCache) -> CacheResult:
        async with cache.serve("key", 2, "default", generate) as result:
            return result

    # Each request reads the (empty) pool, then waits on the spot: for its replica's
    # flight, or (one per replica) the other replica's flight through the index.
    read_pool: set[asyncio.Task[Any] | None] = set()
    waits_across: list[str] = []
    for cache in caches:
        pool, wait_flight = cache.index.pool, cache.index.wait_flight

        async def counted_pool(*args: Any, pool: Any = pool) -> Any:
            rows = await pool(*args)
            read_pool.add(asyncio.current_task())
            return rows

        async def counted_wait(*args: Any, wait_flight: Any = wait_flight) -> Any:
            waits_across.append("wait")
            return await wait_flight(*args)

        cache.index.pool = counted_pool  # type: ignore[method-assign]
        cache.index.wait_flight = counted_wait  # type: ignore[method-assign]
    tasks = [asyncio.create_task(serve(caches[i % 2])) for i in range(10)]
    await asyncio.wait_for(started.wait(), 10)
    await eventually(lambda: len(read_pool) == 10 and waits_across,
                     "every other request at its wait")
    release.set()
    results = await asyncio.gather(*tasks)
    assert calls == [(2, 0)]
    assert sorted(r.status for r in results) == ["HIT"] * 9 + ["MISS"]
    assert {tuple(i.read() for i in r.items) for r in results} == {(b"png-0", b"png-1")}
    for c in caches:
        await c.close()


async def test_a_replica_downloads_only_the_blobs_it_serves_off_the_loop(
        redis_server: RedisServer, tmp_path: Path) -> None:
    """With blobs in Redis, a replica's first hit on a pool spools the images it answers
    from an executor thread. It used to fetch the whole pool (up to ten images), on the
    event loop, holding every other request meanwhile; no-cache fetched it too."""
    def cache(spool: str) -> ResultCache:
        blobs = RedisBlobStore(connect_sync(redis_server.url, TIMEOUT), tmp_path / spool)
        return ResultCache(index(redis_server), blobs, enabled=True, max_bytes=10**9,
                           ttl_seconds=3600)

    async def generate(count: int, offset: int) -> Fresh:
        return Fresh([b"png-%d" % (offset + i) for i in range(count)])

    a, b = cache("a"), cache("b")
    async with a.serve("key", 3, "default", generate) as made:
        assert made.status == "MISS"
    client = b.blobs.r  # type: ignore[attr-defined]
    real_get, reads = client.get, []

    def get(name: str) -> Any:
        reads.append(threading.current_thread())
        return real_get(name)

    client.get = get
    async with b.serve("key", 1, "default", generate) as hit:
        assert hit.status == "HIT" and hit.items[0].read() == b"png-0"
    assert len(reads) == 1 and threading.current_thread() not in reads
    async with b.serve("key", 1, "default", generate) as again:  # spooled: no download
        assert again.status == "HIT"
    async with b.serve("key", 1, "no-cache", generate) as fresh:  # counts the index only
        assert fresh.status == "MISS"
    assert len(reads) == 1
    for c in (a, b):
        await c.close()


async def test_signing_key_is_shared(redis_server: RedisServer) -> None:
    first = shared_signing_key(connect_sync(redis_server.url, TIMEOUT), "")
    second = shared_signing_key(connect_sync(redis_server.url, TIMEOUT), "")
    assert first == second and len(first) == 32
    assert shared_signing_key(redis_server.client(), "configured") == b"configured"


async def test_images_in_redis_any_replica_serves(redis_server: RedisServer,
                                                  tmp_path: Path) -> None:
    key = b"k" * 32
    a = RedisImageStore(connect_sync(redis_server.url, TIMEOUT), tmp_path / "a", key,
                           3600, max_bytes=25)
    b = RedisImageStore(connect_sync(redis_server.url, TIMEOUT), tmp_path / "b", key,
                           3600, max_bytes=25)
    first = a.put(b"0123456789")
    url = a.url("http://x", first)
    query = dict(p.split("=") for p in url.split("?")[1].split("&"))
    # Not in b's spool yet: the blocking Redis read runs off the event loop's thread.
    reads: list[threading.Thread] = []
    get = b.r.get
    b.r.get = lambda key: reads.append(threading.current_thread()) or get(key)  # type: ignore[method-assign]
    fetched = await b.fetch(first, query["expires"], query["signature"])
    assert fetched.read_bytes() == b"0123456789"
    assert reads and threading.current_thread() not in reads
    assert (await b.fetch(first, query["expires"], query["signature"])) == fetched
    assert len(reads) == 1  # spooled: the second download reads no Redis
    # Over the 25-byte budget, the image minted longest ago goes first.
    a.put(b"abcdefghij")
    a.put(b"ABCDEFGHIJ")
    r = redis_server.client()
    assert int(r.get(IMAGES + "total")) == 20
    assert r.get(IMAGES + "data:" + first) is None
    # Cache blobs in Redis: written by one replica, read through another's spool.
    blobs_a = RedisBlobStore(connect_sync(redis_server.url, TIMEOUT), tmp_path / "sa")
    blobs_b = RedisBlobStore(connect_sync(redis_server.url, TIMEOUT), tmp_path / "sb")
    created: list[str] = []
    (item,) = blobs_a.write([b"blob"], created)
    assert created == [item.sha256]
    again: list[str] = []
    blobs_a.write([b"blob"], again)
    assert again == []  # already there: created by nobody now
    assert blobs_b.missing([(item.sha256, 4)]) == [item.sha256]  # not spooled in B yet
    assert blobs_b.fetch([(item.sha256, 4)]) == []
    assert blobs_b.path(item.sha256).read_bytes() == b"blob"
    blobs_b.path(item.sha256).write_bytes(b"bl")  # damaged: fetched again
    assert blobs_b.missing([(item.sha256, 4)]) == [item.sha256]
    assert blobs_b.fetch([(item.sha256, 4)]) == []
    assert blobs_b.path(item.sha256).read_bytes() == b"blob"
    blobs_a.delete([item.sha256])
    assert r.get(BLOBS + item.sha256) is None
    assert blobs_a.fetch([(item.sha256, 4)]) == [item.sha256]  # in Redis neither
    # B's spooled copy goes at its next sweep; a copy still in Redis stays.
    (kept,) = blobs_a.write([b"kept"], [])
    assert blobs_b.fetch([(kept.sha256, 4)]) == []
    assert blobs_b.path(kept.sha256).exists() and blobs_b.path(item.sha256).exists()
    assert blobs_b.prune() == 1
    assert sorted(p.stem for p in (tmp_path / "sb").rglob("*.png")) == [kept.sha256]


async def test_a_commit_whose_reply_was_lost_is_charged_once_and_succeeds(
        redis_server: RedisServer) -> None:
    """Redis ran the commit but the answer never came back: the gateway must not answer
    503 for images it charged, nor charge them twice when it asks again."""
    q = quota(redis_server)
    p = who(images_per_day=10)
    reservation = await q.reserve(p, 3, 0.054, "512x512")
    real = q._commit
    sent: list[object] = []

    async def reply_lost(**kwargs: object) -> object:
        sent.append(kwargs)
        result = await real(**kwargs)
        if len(sent) == 1:
            raise redis.exceptions.ConnectionError("connection reset by peer")
        return result

    q._commit = reply_lost  # type: ignore[assignment]
    await q.commit(reservation, 3, 0.054)  # no StateUnavailable
    assert len(sent) == 2 and reservation.settled
    day = {s.name: s for s in await q.usage(p)}["images_per_day"]
    assert (day.used, day.remaining) == (3, 7)  # once, and nothing still held
    await q.close()


@pytest.mark.parametrize("fault", ["reply_lost", "client_left"])
async def test_a_reserve_whose_reply_never_came_holds_nothing(
        redis_server: RedisServer, fault: str) -> None:
    """Redis took the images, but the gateway never saw the answer (the reply was lost,
    or the client left while the script ran): the hold comes back at once, not after the
    lease (10 minutes here)."""
    q = quota(redis_server, lease=600.0)
    p = who(images_per_day=2)
    real = q._reserve
    never = asyncio.Event()

    async def script_ran_then(**kwargs: object) -> object:
        await real(**kwargs)
        if fault == "reply_lost":
            raise redis.exceptions.ConnectionError("connection reset by peer")
        await never.wait()  # the client leaves while we wait for the reply
        raise AssertionError("unreachable")

    q._reserve = script_ran_then  # type: ignore[assignment]
    task = asyncio.create_task(q.reserve(p, 2, 0.0, "256x256"))
    if fault == "reply_lost":
        with pytest.raises(StorageUnavailable):
            await task
    else:
        await eventually(lambda: _held(q, p, 2), "the script to take the images")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    q._reserve = real  # type: ignore[assignment]
    await eventually(lambda: _held(q, p, 0), "the images to come back")
    await q.reserve(p, 2, 0.0, "256x256")
    await q.close()


async def _held(q: RedisQuota, p: Principal, used: int) -> bool:
    return {s.name: s for s in await q.usage(p)}["images_per_day"].used == used


async def test_an_admit_whose_reply_was_lost_holds_no_slot(redis_server: RedisServer) -> None:
    q = quota(redis_server)
    p = who(max_concurrent=1)
    real = q._admit

    async def reply_lost(**kwargs: object) -> object:
        await real(**kwargs)
        raise redis.exceptions.TimeoutError("Timeout reading from socket")

    q._admit = reply_lost  # type: ignore[assignment]
    with pytest.raises(StorageUnavailable):
        async with q.admit(p):
            pass
    q._admit = real  # type: ignore[assignment]

    async def slot_free() -> bool:
        return {s.name: s for s in await q.usage(p)}["max_concurrent"].used == 0

    await eventually(slot_free, "the slot to be freed")
    async with q.admit(p):
        pass
    await q.close()


async def test_the_refusal_names_the_limit_that_resets_last(redis_server: RedisServer) -> None:
    """Day and month both used up: retrying tomorrow would be refused again."""
    q = quota(redis_server)
    p = who(images_per_day=2, images_per_month=2)
    await q.commit(await q.reserve(p, 2, 0.0, "256x256"), 2, 0.0)
    with pytest.raises(QuotaRejected) as exc:
        await q.reserve(p, 1, 0.0, "256x256")
    assert exc.value.limit == "images_per_month"
    assert "calendar month" in exc.value.message
    await q.close()


async def test_refund_soon_gives_the_hold_back_without_being_awaited(
        redis_server: RedisServer) -> None:
    q = quota(redis_server)
    p = who(images_per_day=2)
    q.refund_soon(await q.reserve(p, 2, 0.0, "256x256"))
    await eventually(lambda: _held(q, p, 0), "the images to come back")
    await q.close()


async def test_refund_soon_during_an_outage_gives_the_hold_back_once_redis_is_back(
        tmp_path: Path) -> None:
    """A charge whose commit an outage failed is refunded with refund_soon (nobody
    awaits it): it must keep trying until Redis is back, not try once and leave the
    hold until the lease ends (10 minutes here)."""
    server = RedisServer(tmp_path / "redis", persist=True)  # the hold survives the kill
    server.start()
    q = quota(server)
    try:
        p = who(images_per_day=2)
        held = await q.reserve(p, 2, 0.0, "256x256")
        real, first_try_failed = q._refund, asyncio.Event()

        async def watched(**kwargs: Any) -> Any:
            try:
                return await real(**kwargs)
            except Exception:
                first_try_failed.set()
                raise

        q._refund = watched  # type: ignore[method-assign]
        server.kill()
        q.refund_soon(held)
        await asyncio.wait_for(first_try_failed.wait(), 10)  # against the dead Redis
        server.start()  # same port, same AOF: the hold is still there
        await eventually(lambda: _held(q, p, 0), "the hold to come back after the outage")
    finally:
        await q.close()
        server.stop()


async def test_abuse_windows_are_shared_by_replicas(redis_server: RedisServer,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A member's requests spread over replicas count in one window, and each signal is
    raised once across them (per-replica windows each saw only part of a member)."""
    cfg = AbuseConfig(window_seconds=600, distinct_end_users=4, limit_hits=3)
    a, b = (RedisAbuseMonitor(connect(redis_server.url, TIMEOUT), TIMEOUT, cfg)
            for _ in range(2))

    def signals(found: list[Suspicion]) -> list[tuple[str, int]]:
        return [(f.reason, f.count) for f in found]

    for monitor, user in ((a, "u1"), (b, "u2"), (a, "u1"), (b, "u3")):
        assert await monitor.observe("alice", user, False) == []  # 3 distinct: not yet
    assert await b.observe("bob", "u4", False) == []  # bob's own window
    assert signals(await a.observe("alice", "u4", False)) == [("many_end_users", 4)]
    assert await b.observe("alice", "u5", False) == []  # once per window, everywhere
    assert await a.observe("alice", None, True) == []
    assert await b.observe("alice", None, True) == []
    assert signals(await a.observe("alice", None, True)) == [("repeated_limit_hits", 3)]

    # report() runs after the answer and calls back; a flood stays bounded in Redis.
    monkeypatch.setattr(abuse_redis, "MAX_TRACKED_END_USERS", 10)
    got: list[Suspicion] = []
    for i in range(30):
        b.report("carol", f"scripted-{i}", False, got.append)
    b.report(None, "x", True, got.append)  # unknown member: nothing to record
    await b.close()
    assert signals(got) == [("many_end_users", 4)]
    r = redis_server.client()
    assert r.zcard(ABUSE_KEYS + b"carol".hex() + ":users") == 10
    assert 0 < r.pttl(ABUSE_KEYS + b"carol".hex() + ":users") <= 600_000
    await a.close()


async def test_a_commit_after_midnight_charges_the_reservations_day_and_month(
        redis_server: RedisServer) -> None:
    """Issue 19 item 4, on Redis: reserved at 23:59:59 on 31 January (UTC), committed
    after midnight; the ledger keys charged are January's."""
    last_second_of_january = 1738367999.0
    now = [last_second_of_january]
    q = RedisQuota(connect(redis_server.url, TIMEOUT), TIMEOUT, lease_seconds=600,
                      clock=lambda: now[0])
    p = who("midnight", images_per_day=5)
    reservation = await q.reserve(p, 2, 0.04, "256x256")
    now[0] += 6
    await q.commit(reservation, 2, 0.04)
    old, new = UserKeys("midnight", last_second_of_january), UserKeys("midnight", now[0])
    assert old.month != new.month and old.day != new.day
    images = [await q.r.hget(k, "images") for k in (old.day, old.month, new.day, new.month)]
    assert images == [b"2", b"2", None, None]
    used = {s.name: s.used for s in await q.usage(p)}
    assert used["images_per_day"] == 0 and used["images_per_month"] == 0
    await q.close()
