"""Generated images: signed-URL hosting and the cache's content-addressed blobs.

The rules live here (image ids, the :class:`Item` a response is made of, atomic
writes, the signing key, disk failures as :class:`gateway.errors.StorageUnavailable`)
with the two protocols the rest of the gateway uses: :class:`Images` (signed-URL
hosting: :mod:`gateway.images.fs`, or :mod:`gateway.images.redis` across replicas) and
:class:`Blobs` (the cache's bytes: :mod:`gateway.images.blobs` on disk, or
:mod:`gateway.images.redis`).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from gateway.errors import disk_unavailable

ID_RE = re.compile(r"^[0-9a-f]{64}$")
log = structlog.get_logger("gateway.storage")


@dataclass(frozen=True)
class Item:
    """One image of a response: its bytes when fresh, its cached file otherwise."""

    sha256: str
    size: int
    data: bytes | None = None
    path: Path | None = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()


class Images(Protocol):
    """Stores PNGs, mints signed URLs and resolves them back to files."""

    dir: Path
    ttl: int

    def clock(self) -> float:
        """The wall clock (unix seconds) URLs are minted and expire by."""
        ...

    def put(self, data: bytes) -> str:
        """Store ``data`` (idempotent) and return its id. Blocking: small files only."""
        ...

    def put_file(self, source: Path, image_id: str) -> str:
        """Expose an already stored file (a cache blob) under ``image_id``."""
        ...

    def url(self, base_url: str, image_id: str, now: float | None = None) -> str: ...

    def resolve(self, image_id: str, expires: str, signature: str,
                now: float | None = None) -> Path:
        """The file behind a URL, or an :class:`ApiError` (403 bad/expired, 404 unknown)."""
        ...

    async def fetch(self, image_id: str, expires: str, signature: str) -> Path:
        """:meth:`resolve` for the request path, never blocking the loop."""
        ...

    def sweep(self, now: float | None = None) -> int: ...

    async def sweeper(self, interval: float) -> None: ...


class Blobs(Protocol):
    """The cache's content-addressed PNG bytes (the index says which pool holds which)."""

    def path(self, sha: str) -> Path:
        """Where a blob's file is, or goes (no disk access)."""
        ...

    def missing(self, blobs: list[tuple[str, int]]) -> list[str]:
        """The shas of ``(sha, size)`` blobs without a file of that size here."""
        ...

    def fetch(self, blobs: list[tuple[str, int]]) -> list[str]:
        """Bring ``blobs`` (found :meth:`missing` here) from where they are kept; the shas
        that are nowhere. Blocking: an executor."""
        ...

    def write(self, images: list[bytes], created: list[str]) -> list[Item]:
        """Store ``images``; the shas of files this call created are added to ``created``
        as it goes. Blocking: an executor."""
        ...

    def delete(self, shas: list[str]) -> None: ...

    def prune(self) -> int:
        """Delete local copies of blobs gone elsewhere; how many."""
        ...


@contextlib.contextmanager
def disk_failures_translated() -> Iterator[None]:
    """Run file operations whose full, read-only, failing or forbidden disk leaves as
    :class:`gateway.errors.StorageUnavailable` (translated where it happens)."""
    try:
        yield
    except OSError as exc:
        failure = disk_unavailable(exc)
        if failure is None:
            raise
        raise failure from exc


class SigningKeyUnusable(OSError):
    """``signing.key`` is there but cannot serve: ``serve`` prints this as one line
    (creating a new one over it failed with a bare ``File exists``)."""


def load_signing_key(configured: str, beside: Path) -> bytes:
    """The configured key, else one generated on first start and kept beside the state."""
    if configured:
        return configured.encode("utf-8")
    path = beside / "signing.key"
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    except OSError as exc:  # e.g. a root-owned file on a container's state volume
        uid = os.getuid()
        raise SigningKeyUnusable(
            f"{path} (the image URL signing key) cannot be read by uid {uid} "
            f"({exc.strerror}): give it that user, chown {uid} {path} (under rootless "
            f"podman: podman unshare chown {uid} {path}), or set images.signing_key"
        ) from None
    except ValueError:  # never shown: it is a secret, even damaged
        raise SigningKeyUnusable(
            f"{path} (the image URL signing key) is not a hex key: delete it to have a "
            "new one made (image URLs issued so far stop working), or set "
            "images.signing_key") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex())
    return key


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
