"""Image and cache bytes in Redis (``images.store: redis``), so any replica serves any.

Each store holds a local spool (a :class:`BlobStore` or an :class:`ImageStore` in a
directory of this replica) and fills it from Redis on first use; Redis is the truth.
Blocking client: these run in executors.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from gateway.errors import ApiError
from gateway.images import ID_RE, Item, atomic_write, log
from gateway.images.blobs import BlobStore
from gateway.images.fs import ImageStore
from gateway.redis.client import FAILURES, PREFIX, limit_arg, lua, text, unavailable

BLOBS = PREFIX + "{c}:blob:"
IMAGES = PREFIX + "{img}:"


class RedisBlobStore:
    """:class:`gateway.images.Blobs` in Redis, spooled to a local directory for reading.

    The cache's byte budget (``cache.max_bytes``) bounds them: eviction hands back
    orphaned shas and :meth:`delete` drops them.
    """

    def __init__(self, client: Any, spool: Path) -> None:
        self.r = client
        self.spool = BlobStore(spool)

    def path(self, sha: str) -> Path:
        return self.spool.path(sha)

    def missing(self, blobs: list[tuple[str, int]]) -> list[str]:
        return self.spool.missing(blobs)

    def fetch(self, blobs: list[tuple[str, int]]) -> list[str]:
        """Spool ``blobs`` from Redis (those a request serves, not its whole pool); the
        shas Redis does not have (at that size) either."""
        lost = []
        for sha, size in blobs:
            try:
                data = self.r.get(BLOBS + sha)
            except FAILURES as exc:
                raise unavailable(exc) from exc
            if data is None or len(data) != size:
                lost.append(sha)
            else:
                atomic_write(self.path(sha), data)
        return lost

    def write(self, images: list[bytes], created: list[str]) -> list[Item]:
        """Spool and store ``images``; ``created`` gets the shas new here or in Redis
        (if the pipeline fails, all of them: it may have run)."""
        items = self.spool.write(images, created)
        try:
            pipe = self.r.pipeline(transaction=False)
            for item, data in zip(items, images, strict=True):
                pipe.set(BLOBS + item.sha256, data, nx=True)
            new = pipe.execute()
        except FAILURES as exc:
            created.extend(i.sha256 for i in items if i.sha256 not in created)
            raise unavailable(exc) from exc
        created.extend(i.sha256 for i, n in zip(items, new, strict=True)
                       if n and i.sha256 not in created)
        return items

    def delete(self, shas: list[str]) -> None:
        self.spool.delete(shas)
        if shas:
            with contextlib.suppress(RedisError):
                self.r.delete(*[BLOBS + s for s in shas])

    def prune(self) -> int:
        """Delete spooled copies of blobs no longer in Redis; how many.

        Only the replica whose pass evicts a blob deletes its own copy: without this the
        other replicas' spools grew by every blob they ever read (53 MB after 2,000
        misses on two replicas with a 100-blob budget, measured by a reviewer). A copy
        pruned while its blob is being written is fetched again by :meth:`fetch`.
        """
        files = list(self.spool.dir.glob("*/*.png"))
        gone = 0
        for start in range(0, len(files), 500):
            batch = files[start:start + 500]
            pipe = self.r.pipeline(transaction=False)
            for f in batch:
                pipe.exists(BLOBS + f.stem)
            try:
                present = pipe.execute()
            except FAILURES as exc:
                raise unavailable(exc) from exc
            for f, there in zip(batch, present, strict=True):
                if not there:
                    f.unlink(missing_ok=True)
                    gone += 1
        return gone


class RedisImageStore:
    """:class:`gateway.images.Images` kept in Redis under a byte budget
    (``images.max_bytes``).

    Any replica serves any URL: the local :class:`ImageStore` is only a spool, filled
    from Redis on first download; it also signs and checks the URLs (every replica has
    the same key). Over budget, the images minted longest ago go first.
    """

    def __init__(self, client: Any, directory: Path, signing_key: bytes, ttl_seconds: int,
                 max_bytes: int | None) -> None:
        self.spool = ImageStore(directory, signing_key, ttl_seconds)
        self.dir, self.ttl = self.spool.dir, self.spool.ttl
        self.r = client
        self.max_bytes = max_bytes
        self._put = client.register_script(lua("put_image"))
        self._sweep = client.register_script(lua("sweep_images"))

    def put(self, data: bytes) -> str:
        image_id = hashlib.sha256(data).hexdigest()
        try:
            self._put(keys=[IMAGES + "data:" + image_id, IMAGES + "mint", IMAGES + "size",
                            IMAGES + "total"],
                      args=[image_id, data, repr(time.time()), limit_arg(self.max_bytes),
                            IMAGES + "data:"])
        except FAILURES as exc:
            raise unavailable(exc) from exc
        return self.spool.put(data)

    def put_file(self, source: Path, image_id: str) -> str:
        return self.put(source.read_bytes())

    def clock(self) -> float:
        return self.spool.clock()

    def url(self, base_url: str, image_id: str, now: float | None = None) -> str:
        return self.spool.url(base_url, image_id, now)

    def resolve(self, image_id: str, expires: str, signature: str, now: float | None = None
                ) -> Path:
        try:
            return self.spool.resolve(image_id, expires, signature, now)
        except ApiError as exc:
            # not_found comes only after the signature and expiry checks passed
            if exc.code != "not_found" or not ID_RE.match(image_id):
                raise
        try:
            data = self.r.get(IMAGES + "data:" + image_id)
        except FAILURES as exc:
            raise unavailable(exc) from exc
        if data is not None:
            atomic_write(self.spool.path(image_id), data)
        return self.spool.resolve(image_id, expires, signature, now)

    async def fetch(self, image_id: str, expires: str, signature: str) -> Path:
        """In the local spool: answered on the loop. Otherwise the blocking Redis read
        and the spool write run in the executor, never stalling the other requests."""
        try:
            return self.spool.resolve(image_id, expires, signature)
        except ApiError as exc:
            if exc.code != "not_found" or not ID_RE.match(image_id):
                raise
        return await asyncio.to_thread(self.resolve, image_id, expires, signature)

    def sweep(self, now: float | None = None) -> int:
        removed = self.spool.sweep(now)
        cutoff = (now if now is not None else time.time()) - self.ttl
        try:
            removed += int(self._sweep(keys=[IMAGES + "mint", IMAGES + "size",
                                             IMAGES + "total"],
                                       args=[repr(cutoff), IMAGES + "data:"]))
        except RedisError as exc:
            log.warning("image_sweep_failed", error=str(exc))
        return removed

    async def sweeper(self, interval: float) -> None:
        """Background task: sweep every ``interval`` seconds until cancelled."""
        await self.spool.sweeper(interval, sweep=self.sweep)


def shared_signing_key(client: Any, configured: str, wait_seconds: float = 30.0) -> bytes:
    """The configured key, else the one the first replica stored (``SET NX``).

    Waits (bounded) for Redis at start-up: under compose or Kubernetes the gateway may
    come up a moment before Redis does.
    """
    if configured:
        return configured.encode("utf-8")
    key = PREFIX + "signing-key"
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            client.set(key, secrets.token_bytes(32).hex(), nx=True)
            return bytes.fromhex(text(client.get(key)))
        except RedisError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)  # Redis not up yet; bounded by the deadline above
