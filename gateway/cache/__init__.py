"""The result cache: pools of variations keyed on decoded pixels plus parameters.

A key (SHA-256 of pixels, size, model, backend identity) holds an ordered *pool* of
generated PNGs. A request for ``n`` takes the first ``n``; a short pool is topped up by
generating only what is missing. Identical misses in flight are coalesced into one
backend call. The bytes are :class:`gateway.images.Blobs`; the index (pools, sizes,
last use) is a :class:`CacheIndex`: :mod:`gateway.cache.sqlite` on one box,
:mod:`gateway.cache.redis` when replicas share it. This package root holds the rules
(keys, policies, pools, single flight) that work the same over either.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import structlog

from gateway.cache.tasks import outlive_cancel
from gateway.errors import StorageUnavailable
from gateway.images import Blobs, Item
from gateway.quota import QuotaRejected

log = structlog.get_logger("gateway.cache")

Status = Literal["HIT", "MISS", "PARTIAL", "BYPASS"]
# A pool never holds more than the largest n a request may ask for: images past it could
# never be served (a request takes the first n), yet every no-cache request appended.
MAX_POOL = 10
Policy = Literal["default", "no-cache", "no-store"]


@dataclass(frozen=True)
class Fresh:
    """What ``generate`` made. ``keep`` False: the images answer this request (and its
    coalesced waiters) but are not pooled, because they are not what the key names (a
    fallback backend made them while the route's first one was failing)."""

    images: list[bytes]
    keep: bool = True
    # What these images cost the request that generated them. The cache begins it after
    # their files are written and before they are indexed, and indexes them only once it
    # has landed: no pooled image is ever left uncharged (a failed charge pools nothing).
    charge: Charge | None = None


class Charge(Protocol):
    """The ledger charge of delivered images, settled by the cache even if the request
    that generated them is cancelled meanwhile (its client left)."""

    def begin(self) -> Awaitable[None]:
        """Start the charge (once; later calls return the same commit) and await it."""
        ...

    def drop(self) -> None:
        """The images went nowhere (their store failed before the charge began): give
        the reservation back. A no-op once the charge has begun."""
        ...


# One generation in flight here: its waiters get the unpooled items, or None (re-read).
Flight = asyncio.Future[list[Item] | None]
# generate(count, offset): ``count`` new images; ``offset`` is their pool position,
# -1 for images that must not repeat earlier ones (``no-cache``, ``no-store``).
Generate = Callable[[int, int], Awaitable[Fresh]]


def cache_key(pixels_sha256: str, size: int, model: str, identity: str,
              controls: str = "") -> str:
    """``controls``: the request's variation controls (strength, hint, seed) as text;
    empty for a plain OpenAI request, whose key it leaves as it always was."""
    text = f"v1\n{pixels_sha256}\n{size}\n{model}\n{identity}"
    if controls:
        text += f"\ncontrols\n{controls}"
    return hashlib.sha256(text.encode()).hexdigest()


def policy_from_header(value: str | None) -> Policy:
    """``Cache-Control: no-store`` bypasses both ways, ``no-cache`` forces fresh images."""
    directives = {d.strip().lower() for d in (value or "").split(",")}
    if "no-store" in directives:
        return "no-store"
    if "no-cache" in directives:
        return "no-cache"
    return "default"


@dataclass(frozen=True)
class CacheResult:
    items: list[Item]
    status: Status
    generated: int  # images this request caused the backend to generate


@dataclass(frozen=True)
class Evicted:
    """What a pass did: ``orphans`` are blob shas no pool references any more (delete
    their files); ``held`` are due keys it kept because a request was serving from them
    (a pass runs again when the last of those requests leaves)."""

    orphans: list[str]
    held: frozenset[str] = frozenset()


class CacheIndex(Protocol):
    """Where pools are recorded: SQLite on one box, Redis across replicas. Storage
    failures raise :class:`gateway.errors.StorageUnavailable`."""

    shared: bool  # other processes write it too: re-read a pool after taking its flight

    async def pool(self, key: str, now: float) -> list[tuple[str, int]]: ...

    async def append(self, key: str, items: list[tuple[str, int]], now: float) -> None: ...

    async def evict(self, max_bytes: int, ttl_seconds: int, now: float,
                    keep: frozenset[str] = frozenset()) -> Evicted:
        """Drop expired and least-recently-used pools, except those in ``keep`` (in use
        by a request right now)."""
        ...

    async def forget(self, key: str, seen: list[tuple[str, int]]) -> list[str]:
        """Drop the pool of ``key`` if it still begins with ``seen`` (a file of it is
        gone); returns the blob shas no pool references any more."""
        ...

    async def unreferenced(self, shas: list[str]) -> list[str]:
        """Those of ``shas`` that no pool references."""
        ...

    async def stats(self) -> tuple[int, int]:
        """(entries, bytes)."""
        ...

    async def acquire_flight(self, key: str, ttl: float) -> bool:
        """Claim generating ``key`` across processes (expires after ``ttl`` seconds)."""
        ...

    async def wait_flight(self, key: str, within: float) -> None:
        """Return when another process's flight for ``key`` ends, or after ``within`` s."""
        ...

    async def release_flight(self, key: str) -> None: ...

    async def close(self) -> None: ...


class _OwnerGone(Exception):
    """The request generating for a key was cancelled (its client went away)."""


class ResultCache:
    """Pool logic and single-flight, over an index and a blob store."""

    def __init__(self, index: CacheIndex, blobs: Blobs, *, enabled: bool,
                 max_bytes: int, ttl_seconds: int, flight_ttl_seconds: float = 600.0) -> None:
        self.index = index
        self.blobs = blobs
        self.enabled = enabled
        self.max_bytes = max_bytes
        self.ttl = ttl_seconds
        self.flight_ttl = flight_ttl_seconds  # how long another replica's flight may hold
        self._flights: dict[str, asyncio.Future[list[Item] | None]] = {}
        self._evicting: asyncio.Task[None] | None = None
        self._evict_again = False  # a store happened since the current pass began
        # Stores (blob write + index append) run concurrently with each other but never
        # with an eviction pass: a pass could otherwise delete a blob that a store had
        # just found already on disk (same bytes) and was about to reference again.
        self._stores = 0
        self._no_stores = asyncio.Event()
        self._no_stores.set()
        self._barrier: asyncio.Future[None] | None = None  # a pass is waiting or running
        # Keys whose pool a request is serving from right now, and how many requests:
        # this process's passes leave them alone, so no file is deleted between lookup
        # and answer (a PARTIAL top-up may take minutes). The next pass takes them if
        # still due. Replicas sharing Redis do not see each other's keys in use.
        self._in_use: dict[str, int] = {}
        self._held: set[str] = set()  # due keys the last pass kept: they were in use
        # Blob files that may no longer be referenced (a store that could not index its
        # new files, a forgotten pool): the next pass deletes those the index does not
        # name, while no store runs (another store may have just indexed the same bytes).
        self._suspects: set[str] = set()
        # Files of forgotten pools that requests here still serve: suspects once the
        # last of those requests leaves.
        self._deferred: dict[str, set[str]] = {}

    async def _pool_items(self, key: str, n: int) -> list[Item]:
        """The first ``n`` of the pool of ``key`` (all of it if smaller); empty, and the
        pool forgotten, if a file of them is gone or damaged.

        A file deleted behind the gateway's back (or by another replica's eviction) used
        to make every request for the image a 500 until the pool expired (30 days), and a
        truncated one was served as it was: now the pool is generated again (a backend's
        seeds follow pool positions, so the whole pool goes). Its remaining files are
        deleted only if no other request here is serving from it. A stat per served
        image (and a download, off the loop, for one in Redis not spooled here yet);
        reading is left to the answer.
        """
        pool = await self.index.pool(key, time.time())
        rows = pool[:n]
        missing = self.blobs.missing(rows)
        if missing:  # rare: not spooled here yet, or gone
            absent = [row for row in rows if row[0] in missing]
            missing = await asyncio.get_running_loop().run_in_executor(
                None, self.blobs.fetch, absent)
        if not missing:
            return [Item(sha, size, path=self.blobs.path(sha)) for sha, size in rows]
        log.warning("cache_file_missing", key=key, files=missing[:3])
        orphans = await self.index.forget(key, rows)
        if self._in_use.get(key, 0) > 1:  # others here still answer from these files
            self._deferred.setdefault(key, set()).update(orphans)
        elif orphans:
            self._suspects.update(orphans)
            self._pass_soon()
        return []

    async def _store(self, key: str, images: list[bytes], charge: Charge | None = None
                     ) -> list[Item]:
        # Shielded: images the backend made are indexed even if the client leaves, so no
        # blob is ever left on disk outside the index (and outside the byte budget).
        return await asyncio.shield(asyncio.ensure_future(
            self._store_now(key, images, charge)))

    async def _store_now(self, key: str, images: list[bytes], charge: Charge | None = None
                         ) -> list[Item]:
        loop = asyncio.get_running_loop()
        while self._barrier is not None:
            await asyncio.shield(self._barrier)
        self._stores += 1
        self._no_stores.clear()
        try:
            created: list[str] = []
            try:
                items = await loop.run_in_executor(None, self.blobs.write, images, created)
                await _begin(charge)  # servable only once paid for
                await self.index.append(key, [(i.sha256, i.size) for i in items], time.time())
            except Exception:  # perhaps not indexed: new files would be outside the budget
                self._suspects.update(created)
                self._pass_soon()
                raise
        finally:
            self._stores -= 1
            if self._stores == 0:
                self._no_stores.set()
        self._pass_soon()
        return items

    def _pass_soon(self) -> None:
        """An eviction pass after this one (or now, if none runs)."""
        self._evict_again = True
        if self._evicting is None or self._evicting.done():
            self._evicting = asyncio.get_running_loop().create_task(
                self._evict_while_needed())

    async def _evict_while_needed(self) -> None:
        """Repeat passes until no store landed during the last one (else a burst of
        stores during a slow pass would leave the cache over budget)."""
        while self._evict_again:
            self._evict_again = False
            try:
                await self.evict()
            except Exception as exc:
                # Nobody awaits this task: an error here (Redis gone mid-pass, a disk
                # failing) would surface only as "Task exception was never retrieved".
                # The next store, or the sweeper, runs a pass again.
                log.warning("cache_eviction_failed", error=type(exc).__name__,
                            detail=str(exc))
                return

    async def evict(self) -> None:
        """One pass: drop expired and least-recently-used pools, delete orphaned blobs."""
        barrier = asyncio.get_running_loop().create_future()
        while self._barrier is not None:
            await asyncio.shield(self._barrier)
        self._barrier = barrier
        try:
            await self._no_stores.wait()
            evicted = await self.index.evict(self.max_bytes, self.ttl, time.time(),
                                             frozenset(self._in_use))
            self._held = set(evicted.held)
            if not self._held.issubset(self._in_use):  # a user left while the pass ran
                self._pass_soon()
            suspects, self._suspects = self._suspects, set()
            orphans = evicted.orphans
            if suspects:
                orphans = [*orphans, *await self.index.unreferenced(sorted(suspects))]
            if orphans:
                await asyncio.get_running_loop().run_in_executor(
                    None, self.blobs.delete, orphans)
        finally:
            self._barrier = None
            barrier.set_result(None)

    async def sweeper(self, interval: float = 60.0) -> None:
        """Background task: expire pools past ``ttl_seconds`` even when no store
        triggers a pass (an idle gateway must not serve an expired HIT)."""
        while True:
            try:
                await self.evict()
                await asyncio.get_running_loop().run_in_executor(None, self.blobs.prune)
            except Exception as exc:  # the state store may be down for a while
                log.warning("cache_sweep_failed", error=type(exc).__name__, detail=str(exc))
            await asyncio.sleep(interval)

    @contextlib.asynccontextmanager
    async def serve(self, key: str, n: int, policy: Policy, generate: Generate,
                    on_wait: Callable[[float], None] | None = None, *,
                    seeded: bool = False) -> AsyncIterator[CacheResult]:
        """``n`` images for ``key`` per ``policy``, generating only what is missing.

        The result's files stay on disk until the block exits: answer inside it.
        ``on_wait(seconds)`` is told of each wait for an identical request's generation
        (succeeded or not): backend time, not the gateway's. ``seeded``: the key's pool
        positions are a client's seeds (position i is seed + i), so ``no-cache`` images,
        which are positions 0.. made again, are never appended after the pool.
        """
        self._in_use[key] = self._in_use.get(key, 0) + 1
        try:
            yield await self._serve(key, n, policy, generate, on_wait or _ignore, seeded)
        finally:
            if self._in_use[key] > 1:
                self._in_use[key] -= 1
            else:
                del self._in_use[key]
                if key in self._held:  # a pass kept it for us: enforce the budget now
                    self._held.discard(key)
                    self._pass_soon()
                if key in self._deferred:  # a forgotten pool's files: free to go now
                    self._suspects.update(self._deferred.pop(key))
                    self._pass_soon()

    async def _serve(self, key: str, n: int, policy: Policy, generate: Generate,
                     on_wait: Callable[[float], None], seeded: bool = False) -> CacheResult:
        if not self.enabled or policy != "default":
            # no-store: a bypass both ways; no-cache: fresh images, appended after the pool
            bypass = not self.enabled or policy == "no-store"
            made = await generate(n, -1)
            landing = asyncio.ensure_future(
                self._charge_then_keep(key, made, room=0 if bypass or seeded else -1))
            return CacheResult((await outlive_cancel(landing))[0],
                               "BYPASS" if bypass else "MISS", n)
        while True:
            pool = await self._pool_items(key, n)
            if len(pool) >= n:
                return CacheResult(pool[:n], "HIT", 0)
            flight = self._flights.get(key)
            if flight is not None:
                # the owner's quota or disconnect is not ours: then try as the owner
                started = time.perf_counter()
                shared: list[Item] | None = None
                try:
                    with contextlib.suppress(QuotaRejected, _OwnerGone):
                        shared = await asyncio.shield(flight)
                finally:
                    on_wait(time.perf_counter() - started)
                if shared is not None and len(shared) >= n:  # made but not pooled: ours too
                    return CacheResult(shared[:n], "HIT", 0)
                continue
            claimed = await self._claim(key, n, pool, on_wait)
            if isinstance(claimed, CacheResult):
                return claimed
            if claimed is not None:
                return await self._generate(key, n, *claimed, generate)

    async def _claim(self, key: str, n: int, pool: list[Item],
                     on_wait: Callable[[float], None]
                     ) -> CacheResult | tuple[list[Item], Flight] | None:
        """Claim generating ``key`` here (local peers wait on the future), then across
        processes. ``pool`` (as just read) and the flight if this request owns it; a hit
        if another process filled the pool meanwhile; None to look again (after waiting
        for another replica's flight)."""
        flight: Flight = asyncio.get_running_loop().create_future()
        self._flights[key] = flight  # result: unpooled items for the waiters, or None
        owned = False
        try:
            owned = await self.index.acquire_flight(key, self.flight_ttl)
            if owned and self.index.shared:
                # Another process may have filled the pool between our read and the lock.
                pool = await self._pool_items(key, n)
                if len(pool) >= n:
                    owned = False
                    await self.index.release_flight(key)
                    return CacheResult(pool[:n], "HIT", 0)
                return pool, flight
            if owned:
                return pool, flight
            started = time.perf_counter()  # another replica generates: wait, then re-read
            try:
                await self.index.wait_flight(key, self.flight_ttl)
            finally:
                on_wait(time.perf_counter() - started)
            return None
        except BaseException:
            if owned:
                owned = False
                await self.index.release_flight(key)
            raise
        finally:
            if not owned:
                self._flights.pop(key, None)
                flight.set_result(None)

    async def _generate(self, key: str, n: int, pool: list[Item], flight: Flight,
                        generate: Generate) -> CacheResult:
        # We own the flight for this key: waiters are answered from what we store.
        missing = n - len(pool)
        try:
            made = await generate(missing, len(pool))
        except BaseException as exc:  # nothing delivered: the flight ends here
            await self._end_flight(key, flight, exc)
            raise
        # Delivered: charged, pooled and the flight ended even if our client leaves now
        # (a disconnect must not leave pooled images unpaid, nor waiters without them).
        settling = asyncio.ensure_future(self._land(key, flight, pool, made))
        fresh = await outlive_cancel(settling)
        return CacheResult(pool + fresh, "PARTIAL" if pool else "MISS", missing)

    async def _end_flight(self, key: str, flight: Flight,
                          outcome: BaseException | list[Item] | None) -> None:
        """Answer the waiters of ``flight`` (an error, shared items, or None: re-read the
        pool) and release the key across processes."""
        if isinstance(outcome, BaseException):
            flight.set_exception(outcome if isinstance(outcome, Exception) else _OwnerGone())
            flight.exception()  # retrieved here, so an unwaited flight logs nothing
        else:
            flight.set_result(outcome)
        self._flights.pop(key, None)
        await self.index.release_flight(key)

    async def _land(self, key: str, flight: Flight,
                    pool: list[Item], made: Fresh) -> list[Item]:
        """Charge and pool what a backend delivered, then end the flight; runs as its
        own task, so it completes even if the request that generated is cancelled."""
        try:
            fresh, pooled = await self._charge_then_keep(key, made)
        except BaseException as exc:
            await self._end_flight(key, flight, exc)
            raise
        # Waiters re-read a pool, or share what could not be pooled.
        await self._end_flight(key, flight, None if pooled else pool + fresh)
        return fresh

    async def _charge_then_keep(self, key: str, made: Fresh, room: int = MAX_POOL
                                ) -> tuple[list[Item], bool]:
        """Charge delivered images and pool what fits in ``room`` (-1: the room the pool
        has left, for ``no-cache`` images appended after it; 0: none, a bypass). Runs as
        its own task: a client that leaves does not stop it."""
        try:
            if room < 0:  # the index alone: a hit checks the files it serves, not this
                room = MAX_POOL - len((await self.index.pool(key, time.time()))[:MAX_POOL])
            return await self._keep(key, made, room)
        except BaseException:
            if made.charge is not None:
                made.charge.drop()
            raise

    async def _keep(self, key: str, made: Fresh, room: int = MAX_POOL) -> tuple[list[Item], bool]:
        """Store what fits in the pool (``room`` images); the rest answer unpooled.
        Returns the items and whether all of them were pooled.

        A store that fails for want of storage (disk full, read-only, the index locked
        or Redis away) answers the images unpooled: they were paid for, and the cache is
        only a saving.
        """
        if not made.keep or room <= 0:
            await _begin(made.charge)
            return _unpooled(made.images), False
        try:
            stored = await self._store(key, made.images[:room], made.charge)
        except StorageUnavailable as exc:
            # A permission error is a configuration to fix, not a disk to wait for: left
            # to fail loudly (503) rather than turn caching off without a word.
            if not exc.transient:
                raise
            await _begin(made.charge)  # a failed charge is no store failure: raised here
            log.warning("cache_store_failed", error=exc.kind, detail=str(exc.__cause__))
            return _unpooled(made.images), False
        return stored + _unpooled(made.images[room:]), room >= len(made.images)

    async def stats(self) -> tuple[int, int]:
        return await self.index.stats()

    async def close(self) -> None:
        if self._evicting is not None:
            await asyncio.gather(self._evicting, return_exceptions=True)
        await self.index.close()


def _ignore(seconds: float) -> None:
    return None


async def _begin(charge: Charge | None) -> None:
    if charge is not None:
        await charge.begin()


def _unpooled(images: list[bytes]) -> list[Item]:
    return [Item(hashlib.sha256(d).hexdigest(), len(d), data=d) for d in images]
