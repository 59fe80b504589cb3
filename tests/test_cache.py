"""The result cache (issue 3): pixel-keyed pools, PARTIAL top-ups, single flight, LRU."""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import io
import threading
from pathlib import Path
from typing import Any

import pytest
from instrumented_backend import Start, register, usage, vary
from PIL import Image, PngImagePlugin
from support import eventually, png_bytes

from gateway.keys import AUDIT, CACHE, LIVE


@pytest.fixture
def instrumented(monkeypatch: pytest.MonkeyPatch, gateway_client: Any) -> Start:
    return register(monkeypatch, gateway_client)


def reencoded(data: bytes) -> bytes:
    """The same pixels as RGBA, other zlib level, other filter, extra metadata."""
    img = Image.open(io.BytesIO(data)).convert("RGBA")
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "GIMP 3.0")
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=9, pnginfo=info, dpi=(300, 300))
    return buf.getvalue()


def images(answer: Any) -> list[bytes]:
    return [base64.b64decode(d["b64_json"]) for d in answer.body["data"]]


def assert_blobs_whole(cache_dir: Path) -> None:
    """Every blob is complete (its name is its SHA-256); no temp file is left."""
    for blob in (cache_dir / "blobs").rglob("*.png"):
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.stem
    assert not list(cache_dir.rglob(".tmp-*"))


def variation_rows(client: Any) -> list[dict[str, Any]]:
    """Audit rows of variation requests, newest first."""
    return [r for r in client.app[AUDIT].query(limit=1000)
            if r["route"] == "/v1/images/variations"]


def blob_bytes(cache_dir: Path) -> int:
    return sum(p.stat().st_size for p in (cache_dir / "blobs").rglob("*") if p.is_file())


async def test_same_pixels_other_encoding_is_a_hit(instrumented: Start) -> None:
    """Acceptance: same pixels, different PNG encoding -> HIT. ``user`` and
    ``response_format`` are not part of the key either."""
    client, backend = await instrumented()
    original = png_bytes(seed=4, compress_level=0)
    other = reencoded(original)
    assert other != original
    first = await vary(client, original, n=2, user="artist-1")
    second = await vary(client, other, n=2, user="artist-2")
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert images(first) == images(second)
    url = await vary(client, other, n=2, response_format="url", token_user="bob")
    assert url.headers["X-Cache"] == "HIT" and len(url.body["data"]) == 2
    assert backend.calls == [2]
    # Different pixels, size or model are different keys.
    assert (await vary(client, png_bytes(seed=5), n=2)).headers["X-Cache"] == "MISS"
    assert (await vary(client, original, n=2, size="512x512")).headers["X-Cache"] == "MISS"
    assert backend.calls == [2, 2, 2]


async def test_n2_then_n5_is_partial_generating_3(instrumented: Start) -> None:
    """Acceptance: n = 2 then n = 5 -> PARTIAL, exactly 3 generated and charged."""
    client, backend = await instrumented()
    image = png_bytes(seed=6)
    two = await vary(client, image, n=2)
    five = await vary(client, image, n=5)
    assert (two.headers["X-Cache"], five.headers["X-Cache"]) == ("MISS", "PARTIAL")
    assert backend.calls == [2, 3]
    assert images(five)[:2] == images(two)
    assert len(set(images(five))) == 5
    assert (await usage(client))["limits"]["images_per_day"]["used"] == 5
    rows = variation_rows(client)[:2]
    assert [(r["cache"], r["images_charged"]) for r in rows] == [("PARTIAL", 3), ("MISS", 2)]
    # The pool now holds 5: any n <= 5 is a HIT with the pool's first n, no charge.
    three = await vary(client, image, n=3)
    assert three.headers["X-Cache"] == "HIT" and images(three) == images(five)[:3]
    assert backend.calls == [2, 3]
    assert (await usage(client))["limits"]["images_per_day"]["used"] == 5


async def test_20_identical_concurrent_misses_make_one_backend_call(
        instrumented: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    """Acceptance: 20 identical misses in flight at once -> exactly one backend call,
    every waiter answered from it, quota charged once (to the one that generated).

    The backend is held until all 20 requests have looked up the cache, so without
    single flight each would have gone on to the backend.
    """
    client, backend = await instrumented()
    index = client.app[CACHE].index
    lookups = 0
    original_pool = index.pool

    async def counting_pool(key: str, now: float) -> list[tuple[str, int]]:
        nonlocal lookups
        lookups += 1
        return await original_pool(key, now)

    monkeypatch.setattr(index, "pool", counting_pool)
    backend.gate.clear()
    image = png_bytes(seed=7)
    tasks = [asyncio.create_task(vary(client, image, n=2, token_user=("alice", "bob")[i % 2]))
             for i in range(20)]
    await eventually(lambda: lookups >= 20 and backend.in_flight == 1,
                     "all 20 requests past the cache lookup, one at the backend")
    backend.gate.set()
    answers = await asyncio.gather(*tasks)
    assert backend.calls == [2]
    assert [a.status for a in answers] == [200] * 20
    assert sorted(a.headers["X-Cache"] for a in answers) == ["HIT"] * 19 + ["MISS"]
    assert len({tuple(images(a)) for a in answers}) == 1
    used = [(await usage(client, u))["limits"]["images_per_day"]["used"]
            for u in ("alice", "bob")]
    assert sorted(used) == [0, 2]
    charged = [r["images_charged"] for r in variation_rows(client)]
    assert sorted(charged) == [0] * 19 + [2]


async def test_exhausted_quota_of_one_member_does_not_refuse_another(instrumented: Start
                                                                     ) -> None:
    """One member's exhausted quota never refuses another member's identical request,
    and the images are charged to whoever generated them."""
    client, backend = await instrumented(users={
        "alice": {"token_sha256": _sha("alice"), "quota": {"images_per_day": 0}},
        "bob": {"token_sha256": _sha("bob")}})
    image = png_bytes(seed=8)
    a, b = await asyncio.gather(vary(client, image), vary(client, image, token_user="bob"))
    assert b.status == 200 and b.headers["X-Cache"] == "MISS"
    # alice either owned the lookup (refused, 429) or waited on bob's call (a free HIT).
    assert (a.status, a.headers.get("X-Cache")) in ((429, None), (200, "HIT"))
    assert backend.calls == [1]
    assert (await usage(client, "bob"))["limits"]["images_per_day"]["used"] == 1
    assert (await usage(client, "alice"))["limits"]["images_per_day"]["used"] == 0


def _sha(user: str) -> str:
    from support import TOKENS, sha

    return sha(TOKENS[user])


async def test_no_cache_appends_fresh_and_no_store_bypasses(instrumented: Start) -> None:
    client, backend = await instrumented()
    image = png_bytes(seed=9)
    pooled = await vary(client, image, n=2)
    fresh = await vary(client, image, n=2, headers={"Cache-Control": "no-cache"})
    assert fresh.headers["X-Cache"] == "MISS" and backend.calls == [2, 2]
    assert not set(images(fresh)) & set(images(pooled))
    four = await vary(client, image, n=4)  # no-cache appended: the pool holds 4
    assert four.headers["X-Cache"] == "HIT"
    assert images(four) == images(pooled) + images(fresh)
    bypass = await vary(client, image, n=1, headers={"Cache-Control": "no-store"})
    assert bypass.headers["X-Cache"] == "BYPASS" and backend.calls == [2, 2, 1]
    assert images(bypass)[0] not in images(four)  # not read from the pool ...
    five = await vary(client, image, n=5)  # ... nor written to it
    assert five.headers["X-Cache"] == "PARTIAL" and backend.calls == [2, 2, 1, 1]
    assert images(five)[:4] == images(four)
    assert (await usage(client))["limits"]["images_per_day"]["used"] == 6


async def test_lru_eviction_keeps_blobs_under_max_bytes(instrumented: Start,
                                                         tmp_path: Path) -> None:
    """Acceptance: eviction keeps the cache directory under max_bytes, least recently
    used first; also after a concurrent burst of misses."""
    probe, _ = await instrumented()
    one = len(images(await vary(probe, png_bytes(seed=100)))[0])
    await probe.close()
    budget = one * 3 + one // 2  # room for 3 single-image pools
    client, backend = await instrumented(cache={"max_bytes": budget,
                                                "dir": str(tmp_path / "lru")})
    cache_dir = Path(client.app[LIVE].current.config.cache.dir)
    cache = client.app[CACHE]

    async def settled() -> None:
        await eventually(lambda: cache._evicting is None or cache._evicting.done(), "eviction")

    a, b, c, d = (png_bytes(seed=s) for s in (11, 12, 13, 14))
    for img in (a, b, c):
        assert (await vary(client, img)).headers["X-Cache"] == "MISS"
        await settled()
    assert (await vary(client, a)).headers["X-Cache"] == "HIT"  # a is now newer than b
    assert (await vary(client, d)).headers["X-Cache"] == "MISS"
    await settled()
    assert blob_bytes(cache_dir) <= budget
    assert (await vary(client, a)).headers["X-Cache"] == "HIT"
    assert (await vary(client, c)).headers["X-Cache"] == "HIT"
    calls = len(backend.calls)
    assert (await vary(client, b)).headers["X-Cache"] == "MISS"  # b was evicted
    assert len(backend.calls) == calls + 1
    await settled()

    answers = await asyncio.gather(*(vary(client, png_bytes(seed=200 + i))
                                     for i in range(12)))
    assert {a.status for a in answers} == {200}
    await eventually(lambda: blob_bytes(cache_dir) <= budget, "the cache back under max_bytes")
    await settled()
    assert blob_bytes(cache_dir) <= budget
    entries, total = await cache.stats()
    assert total <= budget and entries <= 3
    assert_blobs_whole(cache_dir)


async def test_stores_during_a_slow_eviction_are_evicted_too(
        instrumented: Start, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Pools stored while an eviction pass is still deleting files are not left over
    budget: once the pass ends the cache is back under max_bytes without another store."""
    probe, _ = await instrumented()
    one = len(images(await vary(probe, png_bytes(seed=100)))[0])
    await probe.close()
    budget = one * 3 + one // 2
    client, backend = await instrumented(cache={"max_bytes": budget,
                                                "dir": str(tmp_path / "slow")})
    cache = client.app[CACHE]
    cache_dir = Path(client.app[LIVE].current.config.cache.dir)
    for seed in (21, 22, 23):
        await vary(client, png_bytes(seed=seed))
        await eventually(lambda: cache._evicting is None or cache._evicting.done(), "eviction")
    entered, release = threading.Event(), threading.Event()
    original = cache.blobs.delete

    def slow_delete(shas: list[str]) -> None:
        entered.set()
        release.wait(10)
        original(shas)

    monkeypatch.setattr(cache.blobs, "delete", slow_delete)
    try:
        await vary(client, png_bytes(seed=24))  # over budget: a pass starts deleting
        await eventually(entered.is_set, "an eviction pass deleting files")
        late = [asyncio.create_task(vary(client, png_bytes(seed=seed)))
                for seed in (25, 26)]  # stored while (or after) that pass is busy
        await eventually(lambda: backend.calls[-2:] == [1, 1] and len(backend.calls) == 6,
                         "both late requests generated")
    finally:
        release.set()
    assert {a.status for a in await asyncio.gather(*late)} == {200}
    await eventually(lambda: cache._evicting is None or cache._evicting.done(), "eviction")
    assert (await cache.stats())[1] <= budget
    assert blob_bytes(cache_dir) <= budget


async def test_sweeper_expires_pools_while_idle(tmp_path) -> None:
    """An idle gateway must not serve an expired pool: the sweeper drops it."""
    import asyncio
    import time as _time

    from gateway.cache import Fresh, ResultCache
    from gateway.cache.sqlite import SqliteCacheIndex
    from gateway.images.blobs import BlobStore

    cache = ResultCache(SqliteCacheIndex(tmp_path / "index.sqlite3"),
                        BlobStore(tmp_path / "blobs"), enabled=True, max_bytes=10**9,
                        ttl_seconds=1)

    async def generate(count: int, offset: int) -> Fresh:
        return Fresh([f"png-{offset}-{i}".encode() for i in range(count)])

    async with cache.serve("k", 1, "default", generate) as first:
        assert first.status == "MISS"
    async with cache.serve("k", 1, "default", generate) as again:
        assert again.status == "HIT"
    blob = first.items[0].path
    stored_at = _time.time()
    task = asyncio.create_task(cache.sweeper(interval=0.01))
    try:
        await eventually(lambda: _no_pools(cache), "the sweeper dropping the pool", 15)
    finally:
        task.cancel()
    assert _time.time() - stored_at >= 1, "dropped before its ttl"
    assert await cache.stats() == (0, 0)
    assert blob is not None and not blob.exists()
    await cache.close()


async def _no_pools(cache: Any) -> bool:
    return not (await cache.stats())[0]


async def test_hit_recency_kept_in_memory_reaches_the_index(tmp_path: Path) -> None:
    """A hit's last-use time is held in memory; eviction and a restart still see it."""
    import time as _time

    from gateway.cache.sqlite import SqliteCacheIndex

    path, now = tmp_path / "index.sqlite3", _time.time()
    index = SqliteCacheIndex(path)
    await index.append("older", [("s1", 10)], now)
    await index.append("newer", [("s2", 10)], now + 1)
    assert await index.pool("older", now + 2) == [("s1", 10)]  # a hit: now the newest
    await index.close()
    index = SqliteCacheIndex(path)  # restarted
    assert (await index.evict(max_bytes=10, ttl_seconds=3600, now=now + 3)).orphans == ["s2"]
    assert await index.pool("older", now + 4) == [("s1", 10)]
    assert await index.pool("newer", now + 4) == []
    await index.close()


async def test_a_pool_being_served_is_not_evicted_under_it(instrumented: Start) -> None:
    """A PARTIAL top-up takes as long as the backend does. If the pool's TTL ends (or LRU
    picks it) meanwhile, its files must still be there to answer from: 200 with all n,
    charged for what was generated. The next pass takes the entry once it is free."""
    client, backend = await instrumented(quota_defaults={"images_per_day": 100})
    image = png_bytes(seed=11)
    first = await vary(client, image, n=2)
    assert first.status == 200
    cache = client.app[CACHE]
    backend.gate.clear()
    task = asyncio.create_task(vary(client, image, n=5, response_format="b64_json"))
    await eventually(lambda: backend.in_flight == 1, "the PARTIAL top-up at the backend")
    cache.ttl = 0  # the pool is due now ...
    await cache.evict()  # ... and a pass runs while it is in use
    backend.gate.set()
    topped = await task
    assert topped.status == 200, topped.body
    assert topped.headers["X-Cache"] == "PARTIAL"
    assert len(images(topped)) == 5
    assert backend.calls == [2, 3]
    assert (await usage(client))["limits"]["images_per_day"]["used"] == 5
    await cache.evict()  # free now: due, so it goes
    assert (await cache.stats())[0] == 0
    assert blob_bytes(Path(client.app[LIVE].current.config.cache.dir)) == 0  # files gone too


async def test_index_eviction_keeps_keys_in_use(tmp_path: Path) -> None:
    from gateway.cache import Evicted
    from gateway.cache.sqlite import SqliteCacheIndex

    index = SqliteCacheIndex(tmp_path / "index.sqlite3")
    await index.append("old", [("s1", 10)], 100.0)
    await index.append("new", [("s2", 10)], 101.0)
    # Both expired, budget 0: everything would go, but "old" is in use.
    assert await index.evict(0, 1, 200.0, keep=frozenset({"old"})) == Evicted(
        ["s2"], frozenset({"old"}))
    assert await index.pool("old", 201.0) == [("s1", 10)]
    assert await index.evict(0, 1, 202.0) == Evicted(["s1"])
    # A pool whose file is gone is forgotten however fresh, if it is still what was seen.
    await index.append("fresh", [("s3", 10), ("s4", 10)], 300.0)
    assert await index.forget("fresh", [("s9", 10)]) == []  # changed since: kept
    assert await index.forget("fresh", [("s3", 10)]) == ["s3", "s4"]
    assert await index.pool("fresh", 302.0) == [] and await index.stats() == (0, 0)
    await index.close()


async def test_a_fallbacks_images_answer_but_are_not_pooled(
        monkeypatch: pytest.MonkeyPatch, gateway_client: Any) -> None:
    """The route's first backend fails, the fallback answers: that answer (and identical
    requests waiting on it) is served, but the pool stays for the first backend's images,
    so once it is back the same upload is generated by it, not a HIT of the fallback's."""
    import dataclasses

    from instrumented_backend import KIND

    from gateway.keys import LIVE

    register(monkeypatch, gateway_client)
    client = await gateway_client(
        backends=[{"name": "primary", "kind": KIND, "fail": True},
                  {"name": "fallback", "kind": KIND}], route=["primary", "fallback"])
    primary = client.app[LIVE].current.router.backends["primary"]
    fallback = client.app[LIVE].current.router.backends["fallback"]
    image = png_bytes(seed=3)
    fallback.gate.clear()
    tasks = [asyncio.create_task(vary(client, image, n=1)) for _ in range(3)]
    await eventually(lambda: fallback.in_flight == 1, "the fallback generating")
    fallback.gate.set()
    answers = await asyncio.gather(*tasks)
    assert [a.status for a in answers] == [200] * 3
    assert len(fallback.calls) == 1  # the waiters were answered from the same call
    assert len({images(a)[0] for a in answers}) == 1
    primary.options = dataclasses.replace(primary.options, fail=False)  # it is back
    again = await vary(client, image, n=1)
    assert again.headers["X-Cache"] == "MISS" and len(primary.calls) == 2
    assert (await vary(client, image, n=1)).headers["X-Cache"] == "HIT"
    assert len(fallback.calls) == 1


async def test_no_cache_fills_the_pool_up_to_ten_and_no_further(instrumented: Start) -> None:
    """Images past pool position 10 can never be served (n <= 10): no-cache used to
    append them for ever, and every hit read the whole pool."""
    client, backend = await instrumented()
    image = png_bytes(seed=21)
    first = await vary(client, image, n=6)
    fresh = [await vary(client, image, n=6, headers={"Cache-Control": "no-cache"})
             for _ in range(2)]
    assert [f.headers["X-Cache"] for f in fresh] == ["MISS", "MISS"]
    assert len({*images(first), *images(fresh[0]), *images(fresh[1])}) == 18
    ten = await vary(client, image, n=10)
    assert ten.headers["X-Cache"] == "HIT" and backend.calls == [6, 6, 6]
    assert images(ten) == images(first) + images(fresh[0])[:4]
    index = client.app[CACHE].index
    keys = [k for (k,) in index._db.execute("SELECT key FROM entries").fetchall()]
    pools = [await index.pool(k, 0.0) for k in keys]
    assert [len(p) for p in pools] == [10]
    assert (await usage(client))["limits"]["images_per_day"]["used"] == 18


async def test_a_cache_file_deleted_behind_its_back_is_generated_again(
        instrumented: Start) -> None:
    """An admin cleaning the disk (or another replica's eviction) removed a pooled file:
    the next request generates again instead of a 500 until the pool expires."""
    client, backend = await instrumented()
    for seed, fmt in ((22, "b64_json"), (23, "url")):
        image = png_bytes(seed=seed)
        first = await vary(client, image, n=2, response_format=fmt)
        assert first.status == 200 and first.headers["X-Cache"] == "MISS"
        for blob in (Path(client.app[LIVE].current.config.cache.dir) / "blobs").rglob("*.png"):
            blob.unlink()
        again = await vary(client, image, n=2, response_format=fmt)
        assert again.status == 200, again.body
        assert again.headers["X-Cache"] == "MISS"
        hit = await vary(client, image, n=2, response_format=fmt)
        assert hit.headers["X-Cache"] == "HIT"
    assert backend.calls == [2, 2, 2, 2]
    assert (await usage(client))["limits"]["images_per_day"]["used"] == 8


@pytest.mark.parametrize("fault", ["disk_full", "index_locked"])
async def test_a_cache_that_cannot_store_answers_unpooled(
        instrumented: Start, monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    """The cache is a saving: with its disk full or its index locked by another program,
    generated images (already paid for) are answered, charged and not pooled, in both
    formats, instead of a 500 the SDK retried (paying again); no file is left behind."""
    import sqlite3

    client, backend = await instrumented()
    cache_dir = Path(client.app[LIVE].current.config.cache.dir)
    shell = None
    if fault == "disk_full":
        def full(path: Path, data: bytes) -> None:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        monkeypatch.setattr("gateway.images.blobs.atomic_write", full)
    else:
        shell = sqlite3.connect(cache_dir / "index.sqlite3", isolation_level=None)
        shell.execute("BEGIN IMMEDIATE")
    try:
        image = png_bytes(seed=24)
        answers = await asyncio.gather(*(vary(client, image, n=2) for _ in range(3)))
        url = await vary(client, png_bytes(seed=25), n=1, response_format="url")
    finally:
        if shell is not None:
            shell.execute("ROLLBACK")
            shell.close()
    assert [a.status for a in answers] == [200] * 3
    assert {tuple(images(a)) for a in answers} == {tuple(images(answers[0]))}
    assert url.status == 200 and url.body["data"][0]["url"]
    assert backend.calls == [2, 1]  # coalesced waiters share the unpooled images
    assert (await usage(client))["limits"]["images_per_day"]["used"] == 3
    await client.app[CACHE].evict()  # the next pass (the sweeper's, at the latest)
    assert not list((cache_dir / "blobs").rglob("*.png"))
    assert await client.app[CACHE].stats() == (0, 0)


async def test_a_cache_directory_without_permission_fails_loudly(
        instrumented: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    """EACCES is a configuration to fix: a clear 503, not caching silently turned off."""
    client, _ = await instrumented()

    def denied(path: Path, data: bytes) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr("gateway.images.blobs.atomic_write", denied)
    refused = await vary(client, png_bytes(seed=26))
    assert refused.status == 503 and refused.body["error"]["code"] == "storage_unavailable"
    assert (await usage(client))["limits"]["images_per_day"]["used"] == 0


async def test_index_totals_kept_in_memory_match_the_file(tmp_path: Path) -> None:
    """Passes and stats read the byte total and entry count from memory (summing the
    whole index per pass held the loop 35 ms per miss at 80,000 images): they must
    stay what the file says through appends, every kind of eviction and a restart."""
    import random
    import sqlite3

    from gateway.cache.sqlite import SqliteCacheIndex

    def recount() -> tuple[int, int]:
        with sqlite3.connect(tmp_path / "index.sqlite3") as db:
            (entries,) = db.execute("SELECT COUNT(*) FROM entries").fetchone()
            (total,) = db.execute("SELECT COALESCE(SUM(bytes), 0) FROM items").fetchone()
        return entries, total

    rng = random.Random(7)
    index = SqliteCacheIndex(tmp_path / "index.sqlite3")
    for step in range(300):
        key = f"k{rng.randrange(40)}"
        await index.append(key, [(f"s{rng.randrange(60)}", rng.randrange(1, 100))],
                           float(step))
        if step % 7 == 0:
            await index.pool(f"k{rng.randrange(40)}", float(step))  # a hit's recency
        if step % 25 == 0:
            keep = frozenset({f"k{rng.randrange(40)}"})
            await index.evict(rng.randrange(500, 3000), rng.randrange(50, 400), float(step),
                              keep=keep)
        if step % 11 == 0:
            key = f"k{rng.randrange(40)}"
            await index.forget(key, (await index.pool(key, float(step)))[:1])
        assert await index.stats() == recount(), step
    await index.evict(1000, 10**6, 400.0)
    assert (await index.stats())[1] <= 1000
    await index.close()
    reopened = SqliteCacheIndex(tmp_path / "index.sqlite3")
    assert await reopened.stats() == recount()
    await reopened.close()


async def test_forgetting_a_broken_pool_spares_the_files_others_are_serving(
        tmp_path: Path) -> None:
    """A file of a pool is gone: the next request forgets the pool and generates, but
    the files a request still answering from that pool reads stay until it is done."""
    from gateway.cache import Fresh, ResultCache
    from gateway.cache.sqlite import SqliteCacheIndex
    from gateway.images.blobs import BlobStore

    cache = ResultCache(SqliteCacheIndex(tmp_path / "index.sqlite3"),
                        BlobStore(tmp_path / "blobs"), enabled=True, max_bytes=10**9,
                        ttl_seconds=3600)
    made: list[tuple[int, int]] = []

    async def generate(count: int, offset: int) -> Fresh:
        made.append((count, offset))
        return Fresh([f"png-{len(made)}-{offset + i}".encode() for i in range(count)])

    async with cache.serve("k", 3, "default", generate) as first:
        assert first.status == "MISS"
    async with cache.serve("k", 1, "default", generate) as serving:  # still answering
        assert serving.status == "HIT"
        gone = first.items[2].path
        assert gone is not None
        gone.unlink()
        async with cache.serve("k", 3, "default", generate) as healed:
            assert healed.status == "MISS" and made == [(3, 0), (3, 0)]
        await cache.evict()
        assert serving.items[0].read() == b"png-1-0"  # not deleted under the first
    async with cache.serve("k", 3, "default", generate) as hit:
        assert hit.status == "HIT" and [i.read() for i in hit.items] == [
            b"png-2-0", b"png-2-1", b"png-2-2"]
    await cache.evict()  # ... and once it has left, the forgotten pool's files go
    assert sorted(p.read_bytes() for p in (tmp_path / "blobs").rglob("*.png")) == [
        b"png-2-0", b"png-2-1", b"png-2-2"]
    await cache.close()


async def test_a_damaged_cache_file_is_never_served_and_is_replaced(tmp_path: Path) -> None:
    """A pooled file truncated behind the gateway's back (a failing disk, a half copy
    by hand) used to be served as it was: now its pool is made again, and the same
    bytes made again replace the damaged file instead of keeping it."""
    from gateway.cache import Fresh, ResultCache
    from gateway.cache.sqlite import SqliteCacheIndex
    from gateway.images.blobs import BlobStore

    cache = ResultCache(SqliteCacheIndex(tmp_path / "index.sqlite3"),
                        BlobStore(tmp_path / "blobs"), enabled=True, max_bytes=10**9,
                        ttl_seconds=3600)
    made: list[tuple[int, int]] = []

    async def generate(count: int, offset: int) -> Fresh:
        made.append((count, offset))  # seeds follow pool positions: the same bytes again
        return Fresh([b"png-%d-bytes" % (offset + i) for i in range(count)])

    for key in ("k", "same-bytes"):  # two pools naming the same files
        async with cache.serve(key, 2, "default", generate) as first:
            assert first.status == "MISS"
    damaged = first.items[1].path
    assert damaged is not None
    damaged.write_bytes(b"png-1")
    async with cache.serve("k", 2, "default", generate) as again:
        assert again.status == "MISS" and made == [(2, 0), (2, 0), (2, 0)]
    for key in ("k", "same-bytes"):  # the other pool's file was repaired too
        async with cache.serve(key, 2, "default", generate) as hit:
            assert hit.status == "HIT"
            assert [i.read() for i in hit.items] == [b"png-0-bytes", b"png-1-bytes"]
    await cache.evict()  # the pool made again names both files: both stay
    loop = tmp_path / "blobs" / "ab" / ("ab" + "0" * 62 + ".png")
    loop.parent.mkdir(exist_ok=True)
    loop.symlink_to(loop)  # a symlink loop is no file, as for Path.exists()
    assert cache.blobs.missing([(loop.stem, 1)]) == [loop.stem]
    loop.unlink()
    assert sorted(f.read_bytes() for f in (tmp_path / "blobs").rglob("*.png")) == [
        b"png-0-bytes", b"png-1-bytes"]
    await cache.close()


async def test_cleanup_never_deletes_a_file_another_pool_indexed(tmp_path: Path,
                                                                monkeypatch: Any) -> None:
    """Files a failed store created are deleted by the next pass, while no store runs,
    and only if no pool names them: two stores carrying the same bytes may both have
    written the file, and the one that failed must not delete what the other indexed."""
    import hashlib as _hashlib

    from gateway.cache import Fresh, ResultCache
    from gateway.cache.sqlite import SqliteCacheIndex
    from gateway.images import blobs as blobs_module
    from gateway.images.blobs import BlobStore

    cache = ResultCache(SqliteCacheIndex(tmp_path / "index.sqlite3"),
                        BlobStore(tmp_path / "blobs"), enabled=True, max_bytes=10**9,
                        ttl_seconds=3600)
    real = blobs_module.atomic_write

    def full_for_y(path: Path, data: bytes) -> None:
        if data == b"Y":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(blobs_module, "atomic_write", full_for_y)

    def only(images: list[bytes]) -> Any:
        async def generate(count: int, offset: int) -> Fresh:
            return Fresh(images)
        return generate

    async with cache.serve("k2", 2, "default", only([b"W", b"Y"])) as failed:
        assert failed.status == "MISS"  # answered unpooled: its disk was "full"
    # The race, made explicit: X is suspect (a failed store wrote it) when k1 indexes it.
    cache._suspects.add(_hashlib.sha256(b"X").hexdigest())
    async with cache.serve("k1", 1, "default", only([b"X"])) as first:
        assert first.status == "MISS"
    await cache.evict()
    assert sorted(p.read_bytes() for p in (tmp_path / "blobs").rglob("*.png")) == [b"X"]
    async with cache.serve("k1", 1, "default", only([b"Z"])) as again:
        assert again.status == "HIT" and again.items[0].read() == b"X"
    await cache.close()


async def _readyz(client: Any) -> tuple[int, Any]:
    async with client.get("/readyz") as r:
        return r.status, (await r.json())["checks"]["writes"]


@pytest.mark.parametrize("store", ["state", "audit"])
async def test_a_hit_waits_for_its_records_and_readyz_names_the_failing_store(
        instrumented: Start, store: str) -> None:
    """Issue 19 item 16: with the ledger (or the audit) unwritable, a cache hit used to
    be answered with no ledger count or audit row while /readyz stayed ready. Now the
    hit is a 503 storage_unavailable, /readyz names the store, and both recover."""
    from gateway.keys import QUOTA

    client, backend = await instrumented()
    image = png_bytes(seed=77)
    assert (await vary(client, image)).status == 200
    db = client.app[QUOTA]._db if store == "state" else client.app[AUDIT]._db
    db.execute("PRAGMA query_only=ON")  # every write of that store fails, as on a full disk
    try:
        hit = await vary(client, image)
        assert hit.status == 503, hit.body
        assert hit.body["error"]["code"] == "storage_unavailable"
        assert hit.headers["x-should-retry"] == "false"
        status, writes = await _readyz(client)
        assert status == 503 and writes == {store: "failing: OperationalError"}
    finally:
        db.execute("PRAGMA query_only=OFF")
    again = await vary(client, image)
    assert (again.status, again.headers["X-Cache"]) == (200, "HIT")
    assert await _readyz(client) == (200, "ok")
    assert backend.calls == [1]


async def test_a_count_lost_to_a_state_outage_is_the_state_stores_503(
        instrumented: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    """With Redis state, a request's count that Redis (killed after the charge) cannot
    write made the answer a 503 storage_unavailable ("disk full", x-should-retry: false,
    no Retry-After). It is the store's own 503: state_unavailable with Retry-After."""
    import redis.exceptions

    from gateway.keys import QUOTA
    from gateway.redis import client as redis_client

    client, _ = await instrumented()

    def state_away(principal: Any, cache_hit: bool) -> asyncio.Future[None]:
        async def fail() -> None:
            raise redis_client.unavailable(redis.exceptions.ConnectionError("gone"))
        return asyncio.ensure_future(fail())

    monkeypatch.setattr(client.app[QUOTA], "count_request", state_away)
    answer = await vary(client, png_bytes(seed=78))
    assert answer.status == 503, answer.body
    assert answer.body["error"]["code"] == "state_unavailable"
    assert answer.headers["Retry-After"] == str(redis_client.RETRY_AFTER_SECONDS)


async def test_redis_dying_mid_eviction_is_handled_and_logged(
        tmp_path: Path, redis_server: Any) -> None:
    """Issue 19 item 16: an eviction pass that a store starts runs in a task nobody
    awaits; Redis dying during it left "Task exception was never retrieved"."""
    from gateway.cache import Fresh, ResultCache
    from gateway.cache.redis import RedisCacheIndex
    from gateway.images.blobs import BlobStore
    from gateway.redis.client import connect

    index = RedisCacheIndex(connect(redis_server.url, 1.0), 1.0)
    cache = ResultCache(index, BlobStore(tmp_path / "blobs"), enabled=True,
                        max_bytes=10**9, ttl_seconds=3600)

    async def generate(count: int, offset: int) -> Fresh:
        return Fresh([f"png-{offset}-{i}".encode() for i in range(count)])

    async with cache.serve("k", 1, "default", generate) as first:
        assert first.status == "MISS"
    assert cache._evicting is not None
    await asyncio.gather(cache._evicting, return_exceptions=True)
    redis_server.kill()
    cache._pass_soon()  # what the next store does
    task = cache._evicting
    assert task is not None
    await asyncio.wait([task])
    assert task.exception() is None  # handled (and logged), not left to the loop
    await cache.close()


async def test_a_seeded_pool_keeps_its_positions_under_no_cache(instrumented: Start) -> None:
    """Position i of a seed's pool is seed + i: no-cache draws positions 0.. again and
    never appends them after the pool (they would stand at the wrong seeds)."""
    client, backend = await instrumented()
    image = png_bytes(64, seed=61)
    first = await vary(client, image, n=2, seed=500)
    assert first.headers["X-Cache"] == "MISS"
    fresh = await vary(client, image, n=2, seed=500, headers={"Cache-Control": "no-cache"})
    assert fresh.status == 200 and [r.seed for r in backend.requests] == [500, 500]
    # Had the no-cache images been appended, the pool would hold 4: a HIT.
    more = await vary(client, image, n=4, seed=500)  # tops up positions 2 and 3
    assert more.headers["X-Cache"] == "PARTIAL" and backend.requests[-1].seed == 502
    assert more.body["data"][:2] == first.body["data"]
