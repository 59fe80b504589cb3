"""PNG checks on bytes, the pixel hash, and the plain-PNG fast path for backend output."""

from __future__ import annotations

import io

import pytest
from PIL import Image, PngImagePlugin
from support import png_bytes

from gateway import png
from gateway.errors import ApiError


def with_text(data: bytes, **text: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buf, "PNG", pnginfo=info, compress_level=9)
    return buf.getvalue()


def test_fast_path_drops_metadata_and_keeps_pixels() -> None:
    original = with_text(png_bytes(64, "RGBA"), parameters="a secret prompt, steps: 20")
    out = png.plain_png_of_size(original, 64)
    assert out is not None and b"secret prompt" not in out
    assert Image.open(io.BytesIO(out)).tobytes() == Image.open(io.BytesIO(original)).tobytes()


@pytest.mark.parametrize("case", ["wrong-size", "palette", "16-bit", "bad-crc", "truncated",
                                  "jpeg"])
def test_fast_path_declines_what_needs_a_decode(case: str) -> None:
    data = {
        "wrong-size": png_bytes(32),
        "palette": png_bytes(64, "P"),
        "16-bit": _sixteen_bit(),
        "bad-crc": png_bytes(64)[:40] + bytes([png_bytes(64)[40] ^ 1]) + png_bytes(64)[41:],
        "truncated": png_bytes(64)[:-20],
        "jpeg": _jpeg(),
    }[case]
    assert png.plain_png_of_size(data, 64) is None


def test_pixel_hash_ignores_encoding_and_rgb_vs_opaque_rgba() -> None:
    rgb = png_bytes(64)
    rgba = png_bytes(64, "RGBA")
    recompressed = with_text(rgb, note="metadata")
    hashes = set()
    for data in (rgb, rgba, recompressed):
        info = png.inspect(data)
        hashes.add(png.decode(data, info, "x").pixels_sha256)
    assert len(hashes) == 1


def test_huge_ihdr_is_refused_before_decoding() -> None:
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))

    data = (png.SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0,
                                                       0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    with pytest.raises(ApiError) as info:
        png.inspect(data)
    assert info.value.code == "image_too_many_pixels" and info.value.param == "image"


def _sixteen_bit() -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png_bytes(64, "L"))).convert("I;16").save(buf, "PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, "JPEG")
    return buf.getvalue()


def test_kept_uploads_skip_sha256_but_never_trust_the_lookup_key_alone(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import hashlib

    real = hashlib.sha256  # captured before it is patched below

    def sha(data: bytes) -> str:
        return real(data).hexdigest()

    tail = b"t" * png.PixelHashes.TAIL  # same length and tail: the same lookup key
    hashes = png.PixelHashes(keep_bytes=1000)
    known = png.Known(png.PngInfo(1, 1, 8, 2, False, False), "pixels")
    a, b, c = b"a" * 400, b"b" * 336 + tail, b"c" * 700
    for data in (a, b, c):
        hashes.put(sha(data), known)  # decoded once
    calls: list[bytes] = []
    monkeypatch.setattr(png.hashlib, "sha256", lambda d: calls.append(d) or real(d))
    assert hashes.sha256(a) == sha(a) and calls == [a]  # second sighting: hashed, kept
    assert hashes.sha256(a) == sha(a) and calls == [a]  # third: from memory
    assert hashes.sha256(b"z" * 400) == sha(b"z" * 400)  # never decoded: not kept
    assert hashes.sha256(b"z" * 400) == sha(b"z" * 400) and len(calls) == 3
    assert hashes.sha256(b) == sha(b)  # kept now
    y = b"y" * 336 + tail
    assert hashes.sha256(y) == sha(y) and calls[-1] == y  # b's key, other bytes: hashed
    hashes.sha256(c)  # kept; over the 1000-byte budget, the oldest go
    calls.clear()
    assert hashes.sha256(c) == sha(c) and calls == []
    assert hashes.sha256(b) == sha(b) and calls == [b]
