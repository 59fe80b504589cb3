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


def test_kept_uploads_skip_sha256_but_never_trust_the_crc_alone(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import hashlib

    hashes = png.PixelHashes(keep_bytes=1000)
    a, b = b"a" * 400, b"b" * 400
    known = png.Known(png.PngInfo(1, 1, 8, 2, False, False), "pixels")
    hashes.put("stored-sha-of-a", known, a)  # a stand-in, so a memo answer shows
    assert hashes.sha256(a) == "stored-sha-of-a"
    monkeypatch.setattr(png.zlib, "crc32", lambda data: 7)  # every CRC collides now
    assert hashes.sha256(b) == hashlib.sha256(b).hexdigest()
    hashes.put("sha-b", known, b)
    hashes.put("sha-c", known, b"c" * 700)  # over the 1000-byte budget: oldest go
    assert hashes.sha256(b"c" * 700) == "sha-c"
    assert hashes.sha256(a) == hashlib.sha256(a).hexdigest()
