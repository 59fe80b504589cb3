"""Hosting generated images behind signed, expiring URLs, on local disk.

Images are stored content-addressed (``<dir>/<sha[:2]>/<sha>.png``, written to a temp
file and renamed, so a crash never leaves half an image under a real name). A URL
carries ``expires`` and an HMAC over ``id.expires``; a file's mtime is refreshed each
time a URL is minted for it, and a background sweeper deletes files whose newest URL
has expired.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from gateway.errors import ApiError
from gateway.images import ID_RE, atomic_write, disk_failures_translated, log


class ImageStore:
    """:class:`gateway.images.Images` in a local directory (one box, or one every replica
    mounts): stores PNGs, mints signed URLs and resolves them back to files."""

    def __init__(self, directory: Path, signing_key: bytes, ttl_seconds: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.dir = directory
        self.ttl = ttl_seconds
        # The wall clock (unix seconds) URLs expire by; tests inject their own.
        self.clock = clock
        self._key = signing_key
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, image_id: str) -> Path:
        return self.dir / image_id[:2] / f"{image_id}.png"

    def put(self, data: bytes) -> str:
        """Store ``data`` (idempotent) and return its id. Blocking: small files only."""
        image_id = hashlib.sha256(data).hexdigest()
        path = self.path(image_id)
        with disk_failures_translated():
            try:
                os.utime(path)  # already stored: keep it alive for the new URL
            except FileNotFoundError:
                atomic_write(path, data)
        return image_id

    def put_file(self, source: Path, image_id: str) -> str:
        """Expose an already stored file (a cache blob) under ``image_id``.

        A hard link costs no copy and lets the sweeper and the cache evict
        independently; a copy is the fallback across filesystems. A file here of
        another size than ``source`` is replaced: the cache repairs a blob damaged in
        place (so this link was damaged with it) by writing a new file.
        """
        with disk_failures_translated():
            return self._link(source, image_id)

    def _link(self, source: Path, image_id: str) -> str:
        path = self.path(image_id)
        try:
            if os.stat(path).st_size == os.stat(source).st_size:
                os.utime(path)
                return image_id
        except FileNotFoundError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        link = path.with_name(f".link-{secrets.token_hex(8)}")
        try:
            os.link(source, link)
            os.utime(link)  # the link shares the blob's old mtime; the URL is new
            os.replace(link, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(link)
            atomic_write(path, source.read_bytes())
        return image_id

    def _sign(self, image_id: str, expires: int) -> str:
        mac = hmac.new(self._key, f"{image_id}.{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def url(self, base_url: str, image_id: str, now: float | None = None) -> str:
        expires = int((now if now is not None else self.clock()) + self.ttl)
        sig = self._sign(image_id, expires)
        return f"{base_url}/v1/images/files/{image_id}.png?expires={expires}&signature={sig}"

    def resolve(self, image_id: str, expires: str, signature: str, now: float | None = None
                ) -> Path:
        """The file behind a URL, or an :class:`ApiError` (403 bad/expired, 404 unknown)."""
        if not ID_RE.match(image_id):
            raise ApiError(404, "No such image.", code="not_found")
        try:
            exp = int(expires)
        except ValueError:
            raise ApiError(403, "Invalid image URL signature.", code="invalid_signature"
                           ) from None
        # As bytes: comparing str refuses non-ASCII (a TypeError, i.e. a 500, for anyone)
        if not hmac.compare_digest(self._sign(image_id, exp).encode(),
                                   signature.encode("utf-8", "replace")):
            raise ApiError(403, "Invalid image URL signature.", code="invalid_signature")
        if exp < (now if now is not None else self.clock()):
            raise ApiError(403, "This image URL has expired (URLs are valid for "
                           f"{self.ttl} seconds after generation).", code="url_expired")
        path = self.path(image_id)
        if not path.is_file():
            raise ApiError(404, "No such image (it may have been removed).", code="not_found")
        return path

    async def fetch(self, image_id: str, expires: str, signature: str) -> Path:
        """:meth:`resolve` for the request path. Here the file is local, so this runs on
        the loop; a store that must first pull the image from elsewhere does that in the
        executor."""
        return self.resolve(image_id, expires, signature)

    def sweep(self, now: float | None = None) -> int:
        """Delete images whose newest URL has expired; returns how many were deleted."""
        cutoff = (now if now is not None else self.clock()) - self.ttl
        removed = 0
        for sub in self.dir.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                try:
                    if f.stat().st_mtime < cutoff:
                        f.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed

    async def sweeper(self, interval: float,
                      sweep: Callable[[], int] | None = None) -> None:
        """Background task: ``sweep`` (default: :meth:`sweep`) every ``interval`` seconds
        until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                removed = await loop.run_in_executor(None, sweep or self.sweep)
                if removed:
                    log.info("images_swept", removed=removed)
            except OSError as exc:
                log.warning("image_sweep_failed", error=str(exc))
            await asyncio.sleep(interval)
