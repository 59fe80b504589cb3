"""Signed, expiring image URLs and the sweeper."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from gateway.errors import ApiError
from gateway.images import SigningKeyUnusable, load_signing_key
from gateway.images.fs import ImageStore


def _parts(url: str) -> tuple[str, str, str]:
    path, _, query = url.partition("?")
    image_id = path.rsplit("/", 1)[1].removesuffix(".png")
    q = dict(kv.split("=", 1) for kv in query.split("&"))
    return image_id, q["expires"], q["signature"]


def flip(s: str) -> str:
    """Change one character (keeping the alphabet)."""
    c = s[-1]
    return s[:-1] + ("b" if c == "a" else "a")


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images", b"k" * 32, ttl_seconds=60)


def test_round_trip_and_tampering(store: ImageStore) -> None:
    image_id = store.put(b"\x89PNG fake")
    url = store.url("http://h", image_id)
    i, e, s = _parts(url)
    assert store.resolve(i, e, s).read_bytes() == b"\x89PNG fake"
    for bad in ((flip(i), e, s), (i, str(int(e) + 1), s), (i, e, flip(s)), (i, e, s[:-1])):
        with pytest.raises(ApiError) as info:
            store.resolve(*bad)
        assert info.value.status in (403, 404)
    with pytest.raises(ApiError) as info:
        store.resolve(flip(i), e, s)
    assert info.value.status == 403  # a changed id breaks the signature first


def test_expired_url_is_refused(store: ImageStore) -> None:
    image_id = store.put(b"png")
    i, e, s = _parts(store.url("http://h", image_id, now=time.time() - 61))
    with pytest.raises(ApiError) as info:
        store.resolve(i, e, s)
    assert (info.value.status, info.value.code) == (403, "url_expired")


@pytest.mark.parametrize("image_id", ["../../etc/passwd", "a" * 63, "A" * 64, "x.png"])
def test_path_traversal_and_bad_ids_are_404(store: ImageStore, image_id: str) -> None:
    with pytest.raises(ApiError) as info:
        store.resolve(image_id, "9999999999", "sig")
    assert info.value.status == 404


def test_sweeper_deletes_only_expired_files(store: ImageStore) -> None:
    old, new = store.put(b"old"), store.put(b"new")
    past = time.time() - 120
    os.utime(store.path(old), (past, past))
    assert store.sweep() == 1
    assert not store.path(old).exists() and store.path(new).exists()


def test_signing_key_is_generated_once_and_kept(tmp_path: Path) -> None:
    k1 = load_signing_key("", tmp_path)
    assert load_signing_key("", tmp_path) == k1 and len(k1) == 32
    assert (tmp_path / "signing.key").stat().st_mode & 0o777 == 0o600
    assert load_signing_key("configured", tmp_path) == b"configured"


def test_an_unusable_signing_key_file_is_one_sentence_with_the_fix(tmp_path: Path) -> None:
    """A root-owned ``signing.key`` on a container's volume: reading it failed, and the
    O_EXCL create of a new one ended in a bare FileExistsError. (Tests run as root, who
    reads any file: a directory in its place fails to read the same way.)"""
    (tmp_path / "signing.key").mkdir()
    with pytest.raises(SigningKeyUnusable) as info:
        load_signing_key("", tmp_path)
    uid = os.getuid()
    assert str(info.value).startswith(f"{tmp_path / 'signing.key'} (the image URL signing "
                                      f"key) cannot be read by uid {uid} (")
    assert f"podman unshare chown {uid} {tmp_path / 'signing.key'}" in str(info.value)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "signing.key").write_text("not-hex-secret")
    with pytest.raises(SigningKeyUnusable, match="is not a hex key: delete it") as info:
        load_signing_key("", damaged)
    assert "not-hex-secret" not in str(info.value)


def test_put_file_links_a_cache_file_and_replaces_a_damaged_link(
        store: ImageStore, tmp_path: Path) -> None:
    """A cache blob is exposed by a hard link. Damaged in place (truncated), the link is
    damaged too; once the cache has written a good file again, the next put_file links
    that one instead of renewing the damaged link forever."""
    blob = tmp_path / "blob.png"
    blob.write_bytes(b"\x89PNG whole image")
    image_id = store.put_file(blob, "ab" * 32)
    served = store.path(image_id)
    assert served.read_bytes() == b"\x89PNG whole image"
    assert os.stat(served).st_ino == os.stat(blob).st_ino  # a link, not a copy
    with open(blob, "r+b") as f:  # damaged in place: the link shares the inode
        f.truncate(4)
    assert served.read_bytes() == b"\x89PNG"
    blob.unlink()
    blob.write_bytes(b"\x89PNG whole image")  # the cache's repair: a new file
    assert store.put_file(blob, image_id) == image_id
    assert served.read_bytes() == b"\x89PNG whole image"
    assert not list(served.parent.glob(".link-*"))
