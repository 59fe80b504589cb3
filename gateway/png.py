"""PNG inspection and normalisation.

:func:`inspect` reads only the chunk structure (no inflate, no allocation of pixels), so
a 1 KB file that claims 50000x50000 pixels, a truncated file or a JPEG renamed ``.png``
is refused before Pillow sees it. :func:`decode` then decodes the pixels under that
budget and hashes them, so two encodings of the same layer share one cache key.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace

from cachetools import LRUCache
from PIL import Image

from gateway.errors import ApiError, invalid
from gateway.generation import SourceImage

SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_UPLOAD_BYTES = 4 * 1024 * 1024
# 4096 x 4096 RGBA is 64 MiB decoded: the most one upload may cost in memory.
MAX_PIXELS = 4096 * 4096
MAX_CHUNKS = 10_000
_HASH_STRIP_ROWS = 128

_CRITICAL = frozenset({b"IHDR", b"PLTE", b"IDAT", b"IEND"})
_COLOR_TYPES = {0: "grey", 2: "rgb", 3: "palette", 4: "grey+alpha", 6: "rgba"}
_BIT_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}

NOT_PNG = "Uploaded image must be a PNG and less than 4 MB."
CORRUPT = "Uploaded image could not be decoded (corrupt PNG data)."


@dataclass(frozen=True)
class PngInfo:
    width: int
    height: int
    bit_depth: int
    color_type: int
    interlaced: bool
    animated: bool


def _bad(message: str = NOT_PNG, code: str = "invalid_image_format") -> ApiError:
    return invalid(message, "image", code)


def inspect(data: bytes, *, max_pixels: int = MAX_PIXELS) -> PngInfo:
    """Validate the PNG container of ``data`` without decoding pixels.

    Checks the signature, that IHDR comes first (and only there) and is sane, that every
    chunk fits in the file with a correct CRC and a type of four ASCII letters, that no
    critical chunk is one a decoder cannot know (PNG 3rd ed., 5.4: a decoder must refuse
    the file), that IDAT is present in one consecutive run and IEND ends the file, and
    that the image is square and within the pixel budget. Pillow reads past all of these,
    so without this check the cached path (which decodes with Pillow) and the no-store
    path (which only inflates) would judge one upload differently.
    """
    if not data:
        raise _bad("Uploaded image is empty. " + NOT_PNG, "invalid_image_format")
    if len(data) >= MAX_UPLOAD_BYTES:
        raise ApiError(400, NOT_PNG, code="image_too_large", param="image")  # as OpenAI
    if not data.startswith(SIGNATURE):
        raise _bad()
    info: PngInfo | None = None
    seen_idat = seen_iend = animated = idat_ended = False
    for index, ctype, body in _framed_chunks(data):
        if seen_idat and ctype != b"IDAT":
            idat_ended = True
        if index == 1:
            info = _header(ctype, body, max_pixels)
        elif ctype == b"IHDR":
            raise _bad("Uploaded image is not a valid PNG (more than one IHDR chunk).",
                       "invalid_image")
        elif ctype == b"IDAT":
            if idat_ended:
                raise _bad("Uploaded image is not a valid PNG (its IDAT chunks are not "
                           "consecutive).", "invalid_image")
            seen_idat = True
        elif ctype == b"acTL":
            animated = True
        elif ctype == b"IEND":
            seen_iend = True
            break
    if info is None or not seen_idat or not seen_iend:
        raise _bad("Uploaded image is truncated or has no image data. " + NOT_PNG,
                   "invalid_image")
    return replace(info, animated=True) if animated else info


def _framed_chunks(data: bytes) -> Iterator[tuple[int, bytes, bytes]]:
    """``(number, type, body)`` of each chunk of ``data`` (after the signature), once
    its framing is sound: it fits in the file, its CRC matches, its type is four
    letters, it is not a critical chunk no decoder knows, and there are not too many."""
    pos = len(SIGNATURE)
    chunks = 0
    while pos < len(data):
        if pos + 8 > len(data):
            raise _bad("Uploaded image is truncated (incomplete PNG chunk). " + NOT_PNG,
                       "invalid_image")
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 8 + length + 4
        if length > 0x7FFFFFFF or end > len(data):
            raise _bad("Uploaded image is truncated (incomplete PNG chunk). " + NOT_PNG,
                       "invalid_image")
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[end - 4 : end])
        if zlib.crc32(ctype + body) != crc:
            raise _bad("Uploaded image is corrupt (PNG chunk checksum mismatch).",
                       "invalid_image")
        chunks += 1
        if chunks > MAX_CHUNKS:
            raise _bad("Uploaded image has too many PNG chunks.", "invalid_image")
        if not ctype.isalpha():
            raise _bad("Uploaded image is not a valid PNG (a chunk type that is not four "
                       "letters).", "invalid_image")
        if chunks > 1 and ctype[0] < 0x60 and ctype not in _CRITICAL:
            # The ancillary bit (lower case first letter) is clear: a chunk the image
            # cannot be shown without, and no decoder knows it.
            raise _bad(f"Uploaded image has an unknown critical PNG chunk "
                       f"({ctype.decode('ascii')}).", "invalid_image")
        yield chunks, ctype, body
        pos = end


def _header(ctype: bytes, body: bytes, max_pixels: int) -> PngInfo:
    """The first chunk, which must be a sane IHDR of a square image within budget."""
    if ctype != b"IHDR" or len(body) != 13:
        raise _bad("Uploaded image is not a valid PNG (IHDR must come first).",
                   "invalid_image")
    w, h, depth, color, comp, filt, inter = struct.unpack(">IIBBBBB", body)
    if w == 0 or h == 0 or color not in _COLOR_TYPES or depth not in _BIT_DEPTHS[
        color
    ] or comp != 0 or filt != 0 or inter not in (0, 1):
        raise _bad("Uploaded image has an invalid PNG header.", "invalid_image")
    if w != h:
        raise invalid(
            "Invalid input image - expected an image with equal width and height, "
            f"got {w}x{h} instead.", "image", "invalid_image_dimensions")
    if w * h > max_pixels:
        raise invalid(
            f"Invalid input image - {w}x{h} is more than the "
            f"{max_pixels} pixels this gateway decodes.", "image",
            "image_too_many_pixels")
    return PngInfo(w, h, depth, color, bool(inter), False)


@dataclass(frozen=True)
class DecodedImage:
    """Decoded pixels (RGB or RGBA, 8-bit) and their identity."""

    image: Image.Image | None  # kept only when the upload itself cannot be passed on
    width: int
    height: int
    pixels_sha256: str
    upload_sha256: str
    upload: bytes
    reusable: bool  # the upload itself is already a plain 8-bit RGB(A) PNG

    def to_source(self) -> SourceImage:
        """The image backends receive: the upload when it is plain, else re-encoded."""
        if self.reusable or self.image is None:
            png = self.upload
        else:
            buf = io.BytesIO()
            self.image.save(buf, "PNG", compress_level=1)
            png = buf.getvalue()
        return SourceImage(png, self.width, self.height, self.pixels_sha256,
                           self.upload_sha256)


def _to_8bit(img: Image.Image) -> Image.Image:
    if img.mode in ("RGB", "RGBA"):
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: scale to 8 bits instead of clipping at 255.
        return img.point(lambda v: v / 257).convert("L").convert("RGB")
    if img.mode in ("P", "PA"):
        return img.convert("RGBA")
    if img.mode in ("LA", "La"):
        return img.convert("RGBA")
    return img.convert("RGB")


# Chunks that change how pixels look; everything else (text, time, EXIF) is metadata.
_PIXEL_CHUNKS = frozenset({b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND", b"gAMA", b"cHRM",
                           b"sRGB", b"iCCP", b"sBIT"})


def plain_png_of_size(data: bytes, size: int) -> bytes | None:
    """``data`` without metadata chunks when it already is a plain PNG of ``size``
    squared (8-bit RGB or RGBA, one frame, every chunk's CRC intact); ``None`` when it
    is something else; ``ValueError`` when it is such a PNG whose pixel data is broken.

    Lets backends skip a decode and re-encode (3 ms at 256 px) for what upstreams
    usually return, while still dropping e.g. the prompt SD WebUI writes into tEXt. The
    pixel data is still inflated (:func:`check_pixel_data`): a well-framed file with
    garbage in IDAT must not reach the 30-day cache. Bytes after IEND are dropped.
    """
    try:
        info = inspect(data, max_pixels=size * size)
    except ApiError:
        return None
    if info.width != size or not is_plain(info):
        return None
    check_pixel_data(data, info)
    out = [SIGNATURE]
    for ctype, start, end in _chunks(data):
        if ctype in _PIXEL_CHUNKS:
            out.append(data[start:end])
    return b"".join(out)


def _chunks(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """``(type, start, end)`` of each chunk of a PNG :func:`inspect` accepted, up to and
    including IEND (anything after it is not part of the image)."""
    pos = len(SIGNATURE)
    while pos < len(data):
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        yield ctype, pos, end
        if ctype == b"IEND":
            return
        pos = end


# Adam7: (x0, y0, dx, dy) of the seven passes of an interlaced image.
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4),
          (1, 0, 2, 2), (0, 1, 1, 2))
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_INFLATE_PIECE = 256 * 1024
_FEED = 64 * 1024
_MAX_FILTER = 4  # None, Sub, Up, Average, Paeth


def _row_layout(info: PngInfo) -> list[tuple[int, int]]:
    """``(bytes per row including its filter byte, rows)`` of each pass, in order."""
    bits = info.bit_depth * _CHANNELS[info.color_type]
    passes = _ADAM7 if info.interlaced else ((0, 0, 1, 1),)
    layout = []
    for x0, y0, dx, dy in passes:
        w = (info.width - x0 + dx - 1) // dx if info.width > x0 else 0
        h = (info.height - y0 + dy - 1) // dy if info.height > y0 else 0
        if w and h:  # an empty pass has no rows, not even filter bytes
            layout.append((1 + (w * bits + 7) // 8, h))
    return layout


def _inflated(data: bytes) -> Iterator[bytes]:
    """The IDAT stream of ``data``, inflated in pieces of at most ``_INFLATE_PIECE``
    bytes, so a 4096 px upload is never held inflated whole. Input is fed in slices of
    ``_FEED`` bytes: zlib copies the unconsumed input on every capped call, and copying
    a whole 4 MB IDAT per piece would cost more than the inflate. ``zlib.error`` if the
    stream is corrupt."""
    inflater = zlib.decompressobj()
    view = memoryview(data)
    for ctype, start, end in _chunks(data):
        if ctype != b"IDAT":
            continue
        for at in range(start + 8, end - 4, _FEED):
            pending: bytes | memoryview = view[at : min(at + _FEED, end - 4)]
            while pending and not inflater.eof:
                piece = inflater.decompress(pending, _INFLATE_PIECE)
                pending = inflater.unconsumed_tail
                if piece:
                    yield piece
            if inflater.eof:
                return
    rest = inflater.flush()
    if rest:
        yield rest


def check_pixel_data(data: bytes, info: PngInfo) -> None:
    """``ValueError`` unless the IDAT stream of ``data`` (already :func:`inspect`-ed)
    inflates to every row IHDR promises, each with a valid filter type.

    That is what decoding can fail on once the chunk CRCs are right, at a fraction of
    a decode's cost: no unfiltering, no image allocated. Like Pillow, data beyond the
    last row is tolerated, but the rest of the stream must still inflate (a checksum
    that is present must match; a stream cut off after the last row passes, as in
    Pillow) and may not be more than the image again (a decompression bomb). Unlike
    Pillow, a stream that ends cleanly a whole row early is refused: Pillow would paint
    the missing rows black.
    """
    layout = _row_layout(info)
    stream = _inflated(data)
    buf = bytearray()
    try:
        for stride, rows in layout:
            per_block = max(1, _INFLATE_PIECE // stride)
            while rows:
                take = min(rows, per_block)
                need = take * stride
                while len(buf) < need:
                    piece = next(stream, None)
                    if piece is None:
                        raise ValueError("image data ends before the last row")
                    buf += piece
                if max(buf[0:need:stride]) > _MAX_FILTER:
                    raise ValueError("invalid row filter type")
                del buf[:need]
                rows -= take
        extra, limit = len(buf), sum(s * r for s, r in layout)
        for piece in stream:
            if extra > limit:
                break
            extra += len(piece)
        if extra > limit:
            raise ValueError("far more image data than the image holds")
    except zlib.error:
        raise ValueError("image data is not a valid zlib stream") from None


@dataclass(frozen=True)
class Known:
    """What an upload already seen showed: its container, and that its pixel data
    decodes; ``pixels_sha256`` once it was decoded for a cache key (``None`` when it was
    only checked, on the way to a backend that bypassed the cache)."""

    info: PngInfo
    pixels_sha256: str | None = None


class PixelHashes:
    """A bounded memo of upload SHA-256 -> what inspecting and decoding it showed.

    The same upload bytes always inspect and decode the same way, so an artist
    re-sending a layer (the common case for a cache hit) costs a SHA-256 of the bytes,
    not a chunk walk and a decode (~2.9 ms for 512 px). Measured when it was added
    (commit 9663ec6, ``make bench``): cache hit p50 5.2 ms -> 0.6 ms (url, 512x512
    upload). On a team's mixed traffic (``make bench``, ``tests/perf/bench_mixed.py``)
    switching it off cut the req/s to 114 from 330 (+181% with it; rounds +172..+213%)
    and raised the b64_json hit p50 from 15.9 to 70.2 ms; on the gpt-image (no-store)
    row it is +9.9% req/s (+7.7..+22%): the pixel check is skipped for a known upload.
    Only uploads that passed are remembered; a failed check never is.
    """

    def __init__(self, maxsize: int = 8192) -> None:
        self._map: LRUCache[str, Known] = LRUCache(maxsize)

    def get(self, upload_sha256: str) -> Known | None:
        return self._map.get(upload_sha256)

    def put(self, upload_sha256: str, known: Known) -> None:
        """Remember ``known``; a pixel hash already remembered is never forgotten for a
        mere check."""
        if known.pixels_sha256 is None and upload_sha256 in self._map:
            return
        self._map[upload_sha256] = known


def is_plain(info: PngInfo) -> bool:
    """Already what backends take: 8-bit RGB or RGBA, one frame."""
    return info.bit_depth == 8 and info.color_type in (2, 6) and not info.animated


def source_without_hash(data: bytes, info: PngInfo, upload_sha256: str,
                        checked: bool = False) -> SourceImage:
    """The backend's input when the cache is bypassed: no pixel hash is needed then,
    and a plain upload is passed on without decoding it here at all.

    Unless it is ``checked`` already (:class:`PixelHashes` knows it), its pixel data is
    still inflated and checked (:func:`check_pixel_data`, ~1 ms at 512 px against ~1.8
    for a decode), so a corrupt upload gets the same 400 as on the cached path instead
    of reaching, and being paid for at, a backend.
    """
    if is_plain(info):
        if not checked:
            try:
                check_pixel_data(data, info)
            except ValueError:
                raise _bad(CORRUPT, "invalid_image") from None
        return SourceImage(data, info.width, info.height, "", upload_sha256)
    return decode(data, info, upload_sha256).to_source()


def decode(data: bytes, info: PngInfo, upload_sha256: str) -> DecodedImage:
    """Decode validated PNG bytes (CPU-bound: run in an executor).

    RGB and opaque inputs hash as RGBA with alpha 255, so an RGB export and an RGBA
    export of the same opaque layer share a cache key.

    The pixel data is checked first (:func:`check_pixel_data`), exactly as on the
    no-store path: Pillow paints the rows of a stream that ends early black and reads
    past a decompression bomb's surplus, so without it a truncated upload was a 200 here
    and a 400 there.
    """
    try:
        check_pixel_data(data, info)
    except ValueError:
        raise _bad(CORRUPT, "invalid_image") from None
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
            if im.size != (info.width, info.height):
                raise _bad("Uploaded image is not a valid PNG.", "invalid_image")
            im.load()
            img = _to_8bit(im)
    except ApiError:
        raise
    except (OSError, ValueError, SyntaxError, zlib.error, Image.DecompressionBombError):
        raise _bad(CORRUPT, "invalid_image") from None
    # Hashed in strips of full rows (the same bytes as one RGBA tobytes()), so a 4 MB
    # upload never holds a second full-size RGBA copy just to be hashed.
    h = hashlib.sha256(f"{img.width}x{img.height}:".encode())
    for top in range(0, img.height, _HASH_STRIP_ROWS):
        strip = img.crop((0, top, img.width, min(img.height, top + _HASH_STRIP_ROWS)))
        h.update((strip if strip.mode == "RGBA" else strip.convert("RGBA")).tobytes())
    reusable = is_plain(info)
    return DecodedImage(
        image=None if reusable else img,
        width=img.width,
        height=img.height,
        pixels_sha256=h.hexdigest(),
        upload_sha256=upload_sha256,
        upload=data,
        reusable=reusable,
    )
