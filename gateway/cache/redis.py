"""The cache index every replica shares, in Redis, with a cross-replica flight lock."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import Any

from redis.exceptions import RedisError

from gateway.cache import Evicted
from gateway.errors import StorageUnavailable
from gateway.redis.client import PREFIX, Guarded, lua, text

_C = PREFIX + "{c}:"


class RedisCacheIndex(Guarded):
    """:class:`gateway.cache.CacheIndex` in Redis, with a cross-replica flight lock.

    Waiting for another replica's flight does not poll hot: the owner publishes the key
    on release and waiters wake on that message; a backing-off existence check covers
    a lost message or an owner that died (its lock expires).
    """

    CHANNEL = _C + "flights"
    shared = True

    def __init__(self, client: Any, timeout: float) -> None:
        super().__init__(client, timeout)
        self._pool = client.register_script(lua("pool"))
        self._append = client.register_script(lua("append"))
        self._evict = client.register_script(lua("evict"))
        self._release = client.register_script(lua("release_flight"))
        self._tokens: dict[str, str] = {}
        self._wakers: dict[str, asyncio.Event] = {}
        self._waiting: dict[str, int] = {}  # waiters per key: the last one drops its waker
        self._listener: asyncio.Task[None] | None = None

    async def pool(self, key: str, now: float) -> list[tuple[str, int]]:
        items = await self._do(self._pool(keys=[_C + "pool:" + key, _C + "lru"],
                                          args=[repr(now), key]))
        out = []
        for item in items:
            sha, _, size = text(item).partition(" ")
            out.append((sha, int(size)))
        return out

    async def append(self, key: str, items: list[tuple[str, int]], now: float) -> None:
        args: list[Any] = [key, repr(now)]
        for sha, size in items:
            args += [sha, size]
        await self._do(self._append(keys=[_C + "pool:" + key, _C + "lru", _C + "created",
                                          _C + "psize", _C + "total", _C + "refs"], args=args))

    async def evict(self, max_bytes: int, ttl_seconds: int, now: float,
                    keep: frozenset[str] = frozenset()) -> Evicted:
        held, orphans = await self._do(self._evict(
            keys=[_C + "lru", _C + "created", _C + "psize", _C + "total", _C + "refs"],
            args=[_C + "pool:", max_bytes, repr(now - ttl_seconds), 0, *sorted(keep)]))
        return Evicted([text(o) for o in orphans], frozenset(text(k) for k in held))

    async def unreferenced(self, shas: list[str]) -> list[str]:
        counts = await self._do(self.r.hmget(_C + "refs", shas))
        return [sha for sha, n in zip(shas, counts, strict=True) if n is None or int(n) <= 0]

    async def forget(self, key: str, seen: list[tuple[str, int]]) -> list[str]:
        _, orphans = await self._do(self._evict(
            keys=[_C + "lru", _C + "created", _C + "psize", _C + "total", _C + "refs"],
            args=[_C + "pool:", 0, 0, 1, key, *[f"{sha} {size}" for sha, size in seen]]))
        return [text(o) for o in orphans]

    async def stats(self) -> tuple[int, int]:
        pipe = self.r.pipeline(transaction=False)
        pipe.zcard(_C + "created")
        pipe.get(_C + "total")
        entries, total = await self._do(pipe.execute())
        return int(entries), int(total or 0)

    # ---- single flight across replicas
    async def acquire_flight(self, key: str, ttl: float) -> bool:
        token = secrets.token_hex(8)
        ok = await self._do(self.r.set(_C + "flight:" + key, token, nx=True,
                                       px=max(1, int(ttl * 1000))))
        if ok:
            self._tokens[key] = token
        return bool(ok)

    async def release_flight(self, key: str) -> None:
        token = self._tokens.pop(key, "")
        # Best effort: an unreleased lock expires, and waiters see that.
        with contextlib.suppress(StorageUnavailable):
            await self._do(self._release(keys=[_C + "flight:" + key, self.CHANNEL],
                                         args=[token, key]))

    async def wait_flight(self, key: str, within: float) -> None:
        """Return when another replica's flight for ``key`` ends (or after ``within`` s)."""
        self._ensure_listener()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        delay = 0.05
        self._waiting[key] = self._waiting.get(key, 0) + 1
        try:
            while True:
                waker = self._wakers.setdefault(key, asyncio.Event())  # before the check
                if not await self._do(self.r.exists(_C + "flight:" + key)):
                    return
                left = deadline - loop.time()
                if left <= 0:
                    return
                try:
                    async with asyncio.timeout(min(delay, left)):
                        await waker.wait()
                    return
                except TimeoutError:
                    delay = min(delay * 2, 1.0)
        finally:
            # A flight that ended unseen (its lock expired, or it was over before the
            # check) publishes nothing: the waker would stay here for ever.
            self._waiting[key] -= 1
            if not self._waiting[key]:
                del self._waiting[key]
                self._wakers.pop(key, None)

    def _ensure_listener(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            try:
                pubsub = self.r.pubsub()
            except (AttributeError, NotImplementedError):
                return  # no pub/sub on this client (cluster): waiters fall back to polling
            try:
                await pubsub.subscribe(self.CHANNEL)
                backoff = 0.1
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True,
                                                   timeout=5.0)
                    if msg and msg.get("type") == "message":
                        waker = self._wakers.pop(text(msg["data"]), None)
                        if waker is not None:
                            waker.set()
            except (RedisError, OSError):
                await asyncio.sleep(backoff)  # Redis away: retry the subscription, backing off
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        await super().close()
