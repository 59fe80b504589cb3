"""The ``data`` array of a variations response: signed URLs or base64, hot ones memoised.

A cache hit serves the same files request after request. Minting a URL (a file touch,
an HMAC, a ``stat``) and base64-encoding a 300 KB PNG (~0.2 ms) were most of a hit's
cost, so both are remembered:

- a URL minted for an image is handed out again for a short while, at most 1/60 of the
  URL lifetime (and at most 60 s), so it is still valid for at least 59/60 of
  ``images.url_ttl_seconds`` when a client receives it; its ``{"url": ...}`` element is
  kept ready-made too;
- the ``{"b64_json": ...}`` elements of cached images are kept ready-made in a
  byte-bounded LRU (``cache.memory_bytes``).

Both are kept from an image's second use on (a hit), so one-off results never take
memory; images of a ``no-store`` request are never kept.

:meth:`Renderer.from_memory` answers without touching the disk (on the event loop);
:meth:`Renderer.render` does the file work and runs in an executor thread.
"""

from __future__ import annotations

import base64
import json
import threading

from cachetools import LRUCache

from gateway.images import Images, Item

URL_REUSE_MAX_SECONDS = 60.0
URL_MEMO_ENTRIES = 4096


class Base64Memo:
    """The ``{"b64_json": ...}`` array elements of images served from the cache, kept
    ready-made in a byte-bounded LRU (``cache.memory_bytes``; 0 turns it off).

    Why it stays (issue 20 asks each kept trick for its gain): base64 of a 512x512
    result is ~0.2 ms per image, in an executor thread that convoys on the GIL. With it
    (and the URL memo and in-memory state, commit 8728d23) b64_json hits at c=16 went
    from 1,046 to 2,309 req/s; keeping whole elements rather than bare base64 (commit
    f17c257) took them from 2,383 to 2,886 req/s. On a team's mixed traffic (``make
    bench``, ``tests/perf/bench_mixed.py``; half of it b64_json hits) it saved 4-11% of
    the gateway's CPU per request in three A/B runs (req/s +3.7%, rounds -6.9..+15%, in
    the quietest) and the b64_json hit p50 was 10.7 ms with it, 14.9 without. Elements
    are kept from an image's
    second use on (read back from its cache file), so one-off results and no-store
    images (no file) never take memory. Shared by the event loop and executor threads:
    every access holds the lock.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._elements: LRUCache[str, bytes] = LRUCache(max_bytes, getsizeof=len)

    def found(self, items: list[Item]) -> list[bytes] | None:
        """Every item's element if all are kept, else None."""
        with self._lock:
            elements = [self._elements.get(item.sha256) for item in items]
        kept = [e for e in elements if e is not None]
        return kept if len(kept) == len(items) else None

    def element(self, item: Item) -> bytes:
        """The item's element, encoded now if not kept (blocking: an executor)."""
        with self._lock:
            found = self._elements.get(item.sha256)
        if found is not None:
            return found
        encoded = b'{"b64_json":"' + base64.b64encode(item.read()) + b'"}'
        if _reused(item) and len(encoded) <= self.max_bytes:
            with self._lock:
                self._elements[item.sha256] = encoded
        return encoded

    def used(self) -> int:
        with self._lock:
            return int(self._elements.currsize)


class Renderer:
    def __init__(self, store: Images, memory_bytes: int) -> None:
        self.store = store
        self.memory_bytes = memory_bytes
        # Shared by the event loop and executor threads: every access holds the lock.
        self._lock = threading.Lock()
        self._urls: LRUCache[tuple[str, str], tuple[bytes, float]] = LRUCache(
            URL_MEMO_ENTRIES)
        self._b64 = Base64Memo(memory_bytes)
        self._url_reuse = min(URL_REUSE_MAX_SECONDS, store.ttl / 60)

    def from_memory(self, items: list[Item], response_format: str, base: str
                    ) -> list[bytes] | None:
        """The data array if every item is memoised, else None (then call :meth:`render`).

        Arrays are returned as parts for one final join: a b64_json body is copied once.
        """
        if response_format == "b64_json":
            encoded = self._b64.found(items)
            return None if encoded is None else _array(encoded)
        now = self.store.clock()
        with self._lock:
            elements = []
            for item in items:
                found = self._urls.get((base, item.sha256))
                if found is None or now - found[1] >= self._url_reuse:
                    return None
                elements.append(found[0])
        return _array(elements)

    def render(self, items: list[Item], response_format: str, base: str) -> list[bytes]:
        """The data array, reading and storing files as needed (blocking: an executor)."""
        if response_format == "b64_json":
            return _array([self._b64.element(item) for item in items])
        now = self.store.clock()
        elements = []
        for item in items:
            if item.path is not None and item.path.exists():
                image_id = self.store.put_file(item.path, item.sha256)
            else:
                image_id = self.store.put(item.read())
            element = json.dumps({"url": self.store.url(base, image_id, now)}).encode()
            elements.append(element)
            if _reused(item):
                with self._lock:
                    self._urls[(base, item.sha256)] = (element, now)
        return _array(elements)

    def memory_used(self) -> int:
        """Bytes of base64 array elements held (for tests)."""
        return self._b64.used()


def _reused(item: Item) -> bool:
    """Served from the cache's file (a hit), not fresh from a backend."""
    return item.path is not None and item.data is None


def _array(elements: list[bytes]) -> list[bytes]:
    """A JSON array of ready-made elements, as parts (a large base64 one is not copied)."""
    parts = [b"["]
    for i, element in enumerate(elements):
        parts += (b"," if i else b"", element)
    parts.append(b"]")
    return parts
