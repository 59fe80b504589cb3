"""Rendering the data array: memoised URLs and base64, bounded, never for no-store."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from gateway.images import Item
from gateway.images.fs import ImageStore
from gateway.render import Renderer


def cached_item(tmp_path: Path, data: bytes) -> Item:
    import hashlib

    sha = hashlib.sha256(data).hexdigest()
    path = tmp_path / "cache" / f"{sha}.png"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return Item(sha, len(data), path=path)


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images", b"k" * 32, ttl_seconds=3600)


def test_url_is_minted_once_then_reused_within_the_window(tmp_path: Path) -> None:
    now = [1000.0]
    store = ImageStore(tmp_path / "images", b"k" * 32, ttl_seconds=3600,
                       clock=lambda: now[0])
    renderer = Renderer(store, memory_bytes=1024)
    item = cached_item(tmp_path, b"png-a")
    assert renderer.from_memory([item], "url", "http://h") is None  # nothing minted yet
    first = json.loads(b"".join(renderer.render([item], "url", "http://h")))
    again = renderer.from_memory([item], "url", "http://h")
    assert again is not None and json.loads(b"".join(again)) == first
    assert renderer.from_memory([item], "url", "http://other") is None  # per base URL
    # Past the reuse window (60 s for a one-hour lifetime) a new URL is minted.
    now[0] += 59.9
    assert renderer.from_memory([item], "url", "http://h") is not None
    now[0] += 1.2
    assert renderer.from_memory([item], "url", "http://h") is None


def test_reused_url_keeps_most_of_its_lifetime(tmp_path: Path) -> None:
    now = [1000.0]
    store = ImageStore(tmp_path / "images", b"k" * 32, ttl_seconds=6, clock=lambda: now[0])
    renderer = Renderer(store, memory_bytes=0)
    item = cached_item(tmp_path, b"png-b")
    renderer.render([item], "url", "http://h")
    # With a 6 s lifetime a URL is reused for at most 0.1 s.
    now[0] += 0.09999
    assert renderer.from_memory([item], "url", "http://h") is not None
    now[0] += 0.00002
    assert renderer.from_memory([item], "url", "http://h") is None


def test_b64_is_memoised_for_cached_items_within_the_byte_budget(tmp_path: Path,
                                                                 store: ImageStore) -> None:
    a, b = cached_item(tmp_path, b"a" * 300), cached_item(tmp_path, b"b" * 300)
    fresh = Item(a.sha256, a.size, data=b"a" * 300, path=a.path)  # a miss: not kept
    renderer_ = Renderer(store, memory_bytes=500)
    renderer_.render([fresh], "b64_json", "")
    assert renderer_.memory_used() == 0
    renderer = Renderer(store, memory_bytes=500)  # room for one element of ~415 bytes
    assert renderer.from_memory([a], "b64_json", "") is None
    body = json.loads(b"".join(renderer.render([a], "b64_json", "")))
    assert base64.b64decode(body[0]["b64_json"]) == b"a" * 300
    assert json.loads(b"".join(renderer.from_memory([a], "b64_json", "") or [])) == body
    renderer.render([b], "b64_json", "")
    assert renderer.memory_used() == 400 + len(b'{"b64_json":""}')
    assert renderer.from_memory([a], "b64_json", "") is None  # evicted, least recent
    assert renderer.from_memory([b], "b64_json", "") is not None


def test_no_store_images_are_never_kept(tmp_path: Path, store: ImageStore) -> None:
    import hashlib

    data = b"fresh, not cached"
    item = Item(hashlib.sha256(data).hexdigest(), len(data), data=data)  # no file
    renderer = Renderer(store, memory_bytes=1 << 20)
    renderer.render([item], "b64_json", "")
    renderer.render([item], "url", "http://h")
    assert renderer.memory_used() == 0
    assert renderer.from_memory([item], "b64_json", "") is None
    assert renderer.from_memory([item], "url", "http://h") is None
