"""Turning an upstream's image into the PNG the gateway stores.

Every returned image is checked to decode in full and leaves as a PNG of the requested
size, so what the gateway stores does not depend on the backend and a broken image is
the upstream's failure (a ``bad_response``), never cached. Any backend may use this;
the HTTP ones all do.
"""

from __future__ import annotations

import asyncio
import io
import struct
import time
import zlib

from PIL import Image, ImageChops, UnidentifiedImageError

from gateway import png
from gateway.backends.base import bad_response
from gateway.generation import add_normalise_time

# Formats the upstreams we speak to document for their outputs.
IMAGE_FORMATS = frozenset({"PNG", "JPEG", "WEBP"})
MAX_IMAGE_PIXELS = 40_000_000


def to_png(name: str, data: bytes, size: int) -> bytes:
    """Decode an upstream image, fit it to ``size`` squared, re-encode it as PNG.

    Re-encoding also drops metadata (SD WebUI writes its prompt into a PNG text chunk).
    A plain PNG already of the right size only loses its metadata chunks, once its pixel
    data is known to inflate in full; anything else is decoded by Pillow. Either way an
    image that does not decode is the upstream's failure, never stored.

    This runs once per generated image and is the gateway's own CPU time, so each step
    is the cheapest that keeps the picture (``tests/perf/bench_normalise.py`` measures
    them; ``tests/backends/test_normalise.py`` holds the result to the plain Lanczos
    fit): a JPEG is decoded at the smallest DCT scale that still covers ``size``
    (draft mode, 1/2 to 1/8 of the work), often exactly ``size``; other resizing
    reduces by a whole factor first and resamples the rest with Lanczos; the PNG is
    written by :func:`encode_png`.
    """
    try:
        plain = png.plain_png_of_size(data, size)
    except ValueError:
        raise bad_response(name, "PNG with broken pixel data") from None
    if plain is not None:
        return plain
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in IMAGE_FORMATS:
                raise bad_response(name, f"{img.format or 'unknown'} is not PNG/JPEG/WebP")
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise bad_response(name, "image too large")
            if img.format == "JPEG":
                # Scales so that the shorter side stays >= size; JPEGs have no alpha.
                img.draft("RGB", (size, size))
            img.load()
            mode = "RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB"
            out = img.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError,
            Image.DecompressionBombError):
        raise bad_response(name, "not a decodable image") from None
    if out.size != (size, size):
        out = _fit(out, size)
    return encode_png(out)


def _fit(img: Image.Image, size: int) -> Image.Image:
    """``ImageOps.fit`` (centred crop to a square, Lanczos) with ``reducing_gap=2``:
    a whole-factor box reduction first while at least twice ``size`` remains, then
    Lanczos. Pillow documents the result as close to a plain Lanczos; the quality test
    holds it to that."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return img.resize((size, size), Image.Resampling.LANCZOS,
                      box=(left, top, left + side, top + side), reducing_gap=2.0)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR_TYPES = {"RGB": 2, "RGBA": 6}


def _chunk(tag: bytes, body: bytes) -> bytes:
    return (struct.pack(">I", len(body)) + tag + body
            + struct.pack(">I", zlib.crc32(body, zlib.crc32(tag))))


def encode_png(img: Image.Image) -> bytes:
    """An RGB or RGBA image as a PNG, about four times faster than Pillow's encoder.

    Pillow tries all five PNG filters on every row and keeps the best; on a 512 px
    picture that choice costs more than the compression. Here every row uses the "Up"
    filter (difference to the row above, computed in one C call by
    ``ImageChops.subtract_modulo``) and deflate runs at level 1 without LZ77 string
    matching (Huffman only, or run-length for flat pictures): filtered photo detail
    gains little from matching, which is where deflate spends its time. On gpt-image-
    like pictures the file is smaller than Pillow's ``compress_level=1``; the pixels are
    exactly the same (PNG is lossless).
    """
    w, h = img.size
    above = Image.new(img.mode, img.size)  # the first row's "above" is zeros
    above.paste(img.crop((0, 0, w, h - 1)), (0, 1))
    raw = ImageChops.subtract_modulo(img, above).tobytes()
    stride = w * len(img.getbands())
    up = b"\x02"
    rows = b"".join([up + raw[i:i + stride] for i in range(0, len(raw), stride)])
    # Flat pictures (illustrations, backgrounds) filter to runs of zeros: run-length
    # matching shrinks them ~10x and is fast. Photos and noise leave few zeros: there
    # Huffman coding alone is as small and ~1.5 ms faster per 512 px. A 1/61 sample
    # of the filtered bytes decides.
    sample = raw[::61]
    flat = sample.count(0) * 2 >= len(sample)
    z = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE if flat else zlib.Z_HUFFMAN_ONLY)
    idat = z.compress(rows) + z.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, _PNG_COLOUR_TYPES[img.mode], 0, 0, 0)
    return (_PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


async def to_pngs(name: str, images: list[bytes], size: int) -> list[bytes]:
    """:func:`to_png` for each image, off the event loop; the wall time (executor queue
    included) goes to the current :func:`gateway.generation.normalise_clock`."""
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    try:
        return list(await asyncio.gather(
            *(loop.run_in_executor(None, to_png, name, data, size) for data in images)))
    finally:
        add_normalise_time(time.perf_counter() - started)
