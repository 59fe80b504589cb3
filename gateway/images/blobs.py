"""The cache's blobs on local disk, content-addressed and written atomically."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

from gateway.images import Item, atomic_write, disk_failures_translated

# What Path.exists() takes for "no file": a symlink loop too. Others (no permission) are
# raised: a cache directory the gateway cannot read is a loud 503.
_NO_FILE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP})


def _file_size(path: str | Path) -> int | None:
    """The size of the file at ``path``; ``None`` if there is none."""
    try:
        return os.stat(path).st_size
    except OSError as exc:
        if exc.errno in _NO_FILE:
            return None
        raise


class BlobStore:
    """:class:`gateway.images.Blobs` as content-addressed PNG files on local disk:
    ``<dir>/<sha[:2]>/<sha>.png``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, sha: str) -> Path:
        """Where a blob's file is, or goes (no disk access)."""
        return self.dir / sha[:2] / f"{sha}.png"

    def missing(self, blobs: list[tuple[str, int]]) -> list[str]:
        """The shas of ``(sha, size)`` blobs without a file of that size here: deleted,
        or damaged (truncated) behind the gateway's back. Such a file is never served."""
        with disk_failures_translated():
            return [sha for sha, size in blobs if _file_size(self.path(sha)) != size]

    def fetch(self, blobs: list[tuple[str, int]]) -> list[str]:
        """Bring ``blobs`` (found :meth:`missing` here) from where they are kept, such as
        Redis; the shas that are nowhere. Blocking: an executor. Here: nowhere else."""
        return [sha for sha, _ in blobs]

    def write(self, images: list[bytes], created: list[str]) -> list[Item]:
        """Store ``images``; the shas of files this call created are added to ``created``
        as it goes, so a caller whose batch failed part-way (or that cannot index it)
        knows which files may now be nobody's. A damaged file of the same bytes is
        replaced: a pool made again after :meth:`missing` found it must not keep it."""
        out: list[Item] = []
        with disk_failures_translated():
            for data in images:
                sha = hashlib.sha256(data).hexdigest()
                path = self.path(sha)
                present = _file_size(path)
                if present != len(data):
                    if present is None:
                        created.append(sha)
                    atomic_write(path, data)
                out.append(Item(sha, len(data), data=data, path=path))
        return out

    def delete(self, shas: list[str]) -> None:
        for sha in shas:
            self.path(sha).unlink(missing_ok=True)

    def prune(self) -> int:
        """Delete local copies of blobs gone elsewhere (a Redis spool); none here."""
        return 0
