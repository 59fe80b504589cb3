"""PNG checks on bytes, the pixel hash, and the plain-PNG fast path for backend output."""

from __future__ import annotations

import io
import struct
import zlib

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


def test_pixel_hashes_remember_checks_and_decodes_and_stay_bounded() -> None:
    """The upload memo (issue 20: it no longer keeps upload bytes, nor a second memo of
    checked uploads): a check is remembered, a decode's pixel hash replaces it and is
    never forgotten for a later check, and the memo holds at most ``maxsize`` uploads."""
    info = png.PngInfo(1, 1, 8, 2, False, False)
    hashes = png.PixelHashes(maxsize=2)
    assert hashes.get("a") is None
    hashes.put("a", png.Known(info))  # checked on the no-store path
    assert hashes.get("a") == png.Known(info, None)
    hashes.put("a", png.Known(info, "pixels"))  # decoded for a cache key
    hashes.put("a", png.Known(info))  # checked again: the pixel hash stays
    assert hashes.get("a") == png.Known(info, "pixels")
    hashes.put("b", png.Known(info, "b-pixels"))
    hashes.put("c", png.Known(info, "c-pixels"))  # over maxsize: the least recent goes
    assert hashes.get("a") is None and hashes.get("b") == png.Known(info, "b-pixels")
    assert hashes.get("c") == png.Known(info, "c-pixels")


# --------------------------------------------------------------------------- pixel data


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(
        ">I", zlib.crc32(kind + body))


def framed(ihdr: bytes, idat: bytes) -> bytes:
    """A PNG with a flawless container around ``idat`` (the zlib stream as given)."""
    return png.SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def rgb_ihdr(width: int, height: int, interlaced: bool = False) -> bytes:
    return struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, int(interlaced))


def adam7_rows(img: Image.Image) -> bytes:
    """``img`` (RGB) as the filtered rows of an interlaced PNG, filter type 0."""
    w, h = img.size
    px = img.tobytes()
    raw = b""
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4),
                           (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)):
        for y in range(y0, h, dy):
            row = b"".join(px[(y * w + x) * 3:(y * w + x) * 3 + 3] for x in range(x0, w, dx))
            if row:
                raw += b"\0" + row
    return raw


def pillow_decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except (OSError, SyntaxError, ValueError):
        return False
    return True


def check(data: bytes) -> bool:
    try:
        png.check_pixel_data(data, png.inspect(data))
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1", "I;16"])
def test_pixel_check_accepts_what_pillow_writes(mode: str) -> None:
    for edge in (1, 7, 64, 300):
        img = Image.open(io.BytesIO(png_bytes(edge))).convert(
            "L" if mode in ("1", "I;16") else "RGB").convert(mode)
        buf = io.BytesIO()
        img.save(buf, "PNG")
        assert check(buf.getvalue()), (mode, edge)


@pytest.mark.parametrize("edge", [1, 2, 3, 5, 8, 9, 17])
def test_pixel_check_follows_adam7_interlacing(edge: int) -> None:
    img = Image.open(io.BytesIO(png_bytes(edge))).convert("RGB")
    raw = adam7_rows(img)
    whole = framed(rgb_ihdr(edge, edge, True), zlib.compress(raw))
    assert pillow_decodes(whole) and check(whole)
    with Image.open(io.BytesIO(whole)) as im:
        assert im.convert("RGB").tobytes() == img.tobytes()  # the rows really are Adam7
    short = framed(rgb_ihdr(edge, edge, True), zlib.compress(raw[:-1]))
    assert not pillow_decodes(short) and not check(short)


def _stream(raw: bytes, case: str) -> bytes:
    good = zlib.compress(raw)
    return {
        "complete": good,
        "garbage": b"garbage, not a zlib stream" * 8,
        "cut mid-row": zlib.compress(raw[:-10]),
        "a whole row short": zlib.compress(raw[:-49]),
        "bad filter type": zlib.compress(b"\x07" + raw[1:]),
        "bad adler-32": good[:-1] + bytes([good[-1] ^ 1]),
        "no adler-32": good[:-4],
        "data after the last row": zlib.compress(raw + b"\0" * 99),
        "bytes after the stream": good + b"junk",
        "flipped byte mid-stream": good[:20] + bytes([good[20] ^ 0xFF]) + good[21:],
    }[case]


# case -> (the check accepts, Pillow's decode accepts)
STREAMS = {"complete": (True, True), "garbage": (False, False),
           "cut mid-row": (False, False), "a whole row short": (False, True),
           "bad filter type": (False, False), "bad adler-32": (False, False),
           "no adler-32": (True, True), "data after the last row": (True, True),
           "bytes after the stream": (True, True), "flipped byte mid-stream": (False, False)}


@pytest.mark.parametrize("case", list(STREAMS))
def test_pixel_check_refuses_what_a_decode_refuses(case: str) -> None:
    """So the no-store path refuses what the cached path's decode refuses, without
    decoding; it is stricter only where Pillow would paint missing rows black."""
    img = Image.open(io.BytesIO(png_bytes(16))).convert("RGB")
    raw = b"".join(b"\0" + img.tobytes()[y * 48:(y + 1) * 48] for y in range(16))
    data = framed(rgb_ihdr(16, 16), _stream(raw, case))
    assert (check(data), pillow_decodes(data)) == STREAMS[case]


def test_pixel_check_refuses_a_decompression_bomb_tail() -> None:
    raw = b"".join(b"\0" + bytes(48) for _ in range(16))
    assert not check(framed(rgb_ihdr(16, 16), zlib.compress(raw + bytes(10 * len(raw)))))


def test_fast_path_refuses_garbage_pixel_data_and_drops_bytes_after_iend() -> None:
    with pytest.raises(ValueError):  # a PNG, so no decode could do better: refused
        png.plain_png_of_size(framed(rgb_ihdr(64, 64), b"garbage" * 20), 64)
    original = png_bytes(64)
    out = png.plain_png_of_size(original + b"\0\0", 64)
    assert out == original  # the stray bytes are not part of the image


def test_no_store_source_refuses_corrupt_pixel_data_like_a_decode() -> None:
    data = framed(rgb_ihdr(64, 64), b"not zlib at all" * 10)
    info = png.inspect(data)  # the container is flawless
    with pytest.raises(ApiError) as decoded:
        png.decode(data, info, "x")
    with pytest.raises(ApiError) as passed_on:
        png.source_without_hash(data, info, "x")
    for err in (decoded.value, passed_on.value):
        assert (err.status, err.param, err.code) == (400, "image", "invalid_image")
    good = png_bytes(64)
    source = png.source_without_hash(good, png.inspect(good), "sha")
    assert source.png is good and source.upload_sha256 == "sha"


def _rgb_rows(edge: int, rows: int) -> bytes:
    return (b"\0" + bytes(range(48)) * (edge * 3 // 48)) * rows


# case -> the PNG, each with a flawless chunk framing (issue 19, item 5)
def _container_cases() -> dict[str, bytes]:
    ihdr, rows = chunk(b"IHDR", rgb_ihdr(64, 64)), _rgb_rows(64, 64)
    idat, iend = chunk(b"IDAT", zlib.compress(rows)), chunk(b"IEND", b"")
    half = len(rows) // 2
    return {
        "two IHDR chunks": png.SIGNATURE + ihdr + ihdr + idat + iend,
        "a second IHDR after IDAT": png.SIGNATURE + ihdr + idat + ihdr + iend,
        "unknown critical chunk": png.SIGNATURE + ihdr + chunk(b"ZZZZ", b"x") + idat + iend,
        "chunk type not letters": png.SIGNATURE + ihdr + chunk(b"a1b2", b"") + idat + iend,
        "IDAT chunks not consecutive": png.SIGNATURE + ihdr + b"".join(
            [chunk(b"IDAT", part) for part in _split(zlib.compress(rows), half)][:1])
        + chunk(b"tEXt", b"a\0b") + b"".join(
            [chunk(b"IDAT", part) for part in _split(zlib.compress(rows), half)][1:]) + iend,
    }


def _split(data: bytes, at: int) -> list[bytes]:
    at = min(at, len(data) // 2)
    return [data[:at], data[at:]]


@pytest.mark.parametrize("case", list(_container_cases()))
def test_inspect_refuses_containers_pillow_reads_past(case: str) -> None:
    data = _container_cases()[case]
    with pytest.raises(ApiError) as info:
        png.inspect(data)
    assert (info.value.status, info.value.param, info.value.code) == (
        400, "image", "invalid_image")


def test_an_unknown_ancillary_chunk_is_still_fine() -> None:
    ihdr, rows = chunk(b"IHDR", rgb_ihdr(64, 64)), _rgb_rows(64, 64)
    data = (png.SIGNATURE + ihdr + chunk(b"zzZz", b"private") + chunk(
        b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    assert png.inspect(data).width == 64


def test_decode_refuses_pixel_data_that_ends_rows_early() -> None:
    """The cached path decodes with Pillow, which paints missing rows black: 10 of 64
    rows was a 200 there and a 400 on the no-store path."""
    data = framed(rgb_ihdr(64, 64), zlib.compress(_rgb_rows(64, 10)))
    assert pillow_decodes(data)  # what the cached path used to accept
    with pytest.raises(ApiError) as info:
        png.decode(data, png.inspect(data), "x")
    assert (info.value.status, info.value.code) == (400, "invalid_image")
