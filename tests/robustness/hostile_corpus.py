"""The hostile-input corpus: raw requests to ``POST /v1/images/variations``, each with
the answer the gateway owes it.

Every case is built deterministically from code (no binary blobs in git, nothing
random), so a failing case is reproducible by name: ``python make_corpus.py DIR`` writes
each request's exact bytes to ``DIR/<name>.http`` for replay with ``nc``.

``status`` is the one status expected; ``param``/``code`` the envelope's fields.
``envelope=False`` marks requests whose HTTP framing itself is broken: aiohttp's parser
refuses those before the application (and its error middleware) ever runs, so the
contract there is a 4xx or a closed connection, never a hang. ``charged`` is how many
images a case may cost: only valid-but-unusual inputs are accepted (n=1 at 256x256).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image
from rawhttp import request_bytes
from support import TOKENS, png_bytes

PATH = "/v1/images/variations"
BOUNDARY = "vg-hostile-boundary-7f3a"
AUTH = f"Bearer {TOKENS['alice']}"
Parts = list[bytes | float]


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], Parts]
    status: int | None  # None: the connection may only be closed, without an answer
    param: str | None = None
    code: str | None = None
    envelope: bool = True
    charged: int = 0
    also: tuple[int | None, ...] = field(default=())  # other acceptable outcomes


# ------------------------------------------------------------------ PNG builders


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(
        ">I", zlib.crc32(kind + body))


SIG = b"\x89PNG\r\n\x1a\n"


def ihdr(w: int, h: int, depth: int = 8, color: int = 2, interlace: int = 0) -> bytes:
    return chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, interlace))


def raw_png(w: int, h: int, rows: bytes | None = None, *, color: int = 2, depth: int = 8,
            before_idat: bytes = b"", after_iend: bytes = b"", interlace: int = 0) -> bytes:
    """A hand-built PNG; ``rows`` defaults to black filter-0 scanlines."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color]
    if rows is None:
        rows = (b"\0" + b"\0" * (w * channels * depth // 8)) * h
    return (SIG + ihdr(w, h, depth, color, interlace) + before_idat
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"") + after_iend)


def small_png() -> bytes:
    return png_bytes(32, "RGB", seed=5)


ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4),
         (1, 0, 2, 2), (0, 1, 1, 2))  # x0, y0, dx, dy per pass


def interlaced_png(side: int = 48) -> bytes:
    """An Adam7-interlaced RGB PNG, built by hand (Pillow cannot write interlaced)."""
    rows = b""
    for x0, y0, dx, dy in ADAM7:
        pw, ph = (side - x0 + dx - 1) // dx, (side - y0 + dy - 1) // dy
        if pw and ph:
            for y in range(ph):
                rows += b"\0" + bytes((x * 5 + y * 3 + x0) % 256 for x in range(pw * 3))
    return raw_png(side, side, rows, interlace=1)


def apng() -> bytes:
    frames = [Image.new("RGBA", (40, 40), c) for c in ("red", "green", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:], duration=100,
                   loop=0)
    data = buf.getvalue()
    assert b"acTL" in data and b"fdAT" in data
    return data


def apng_bomb_frames() -> bytes:
    """An APNG whose acTL claims 2^31 frames; only the first frame may be decoded."""
    base = apng()
    start = base.index(b"acTL") - 4
    body = struct.pack(">II", 0x7FFFFFFF, 0)
    return base[:start] + chunk(b"acTL", body) + base[start + 20:]


def jpeg(mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (32, 32), "red" if mode == "RGB" else (0, 255, 255, 0)).save(buf, "JPEG")
    return buf.getvalue()


def jpeg_behind_png_signature() -> bytes:
    return SIG + jpeg("CMYK")


def cmyk_jpeg_in_idat() -> bytes:
    """PNG framing around CMYK JPEG bytes: passes the container check, fails decoding."""
    return SIG + ihdr(32, 32) + chunk(b"IDAT", jpeg("CMYK")) + chunk(b"IEND", b"")


def chunk_flood() -> bytes:
    """10,001 empty ancillary chunks: many tiny allocations, no pixels."""
    return raw_png(8, 8, before_idat=chunk(b"tEXt", b"") * 10_001)


def text_bomb() -> bytes:
    """A zTXt chunk inflating to 64 MiB (about 64 KB on the wire)."""
    z = b"Comment\0\0" + zlib.compress(b"A" * (64 << 20), 9)
    return raw_png(16, 16, before_idat=chunk(b"zTXt", z))


def iccp_bomb() -> bytes:
    z = b"icc\0\0" + zlib.compress(b"\0" * (64 << 20), 9)
    return raw_png(16, 16, before_idat=chunk(b"iCCP", z))


def idat_bomb() -> bytes:
    """16x16 pixels whose IDAT inflates to 256 MiB of scanline data."""
    return raw_png(16, 16, rows=b"\0" * (256 << 20))


def huge_claim_tiny_data(side: int) -> bytes:
    return raw_png(side, side, rows=b"\0" * 64)


def palette_without_plte() -> bytes:
    return raw_png(16, 16, color=3, depth=8)


def with_crc(data: bytes, offset_from_end: int = 0) -> bytes:
    """Flip one byte of the last IDAT's CRC."""
    i = data.rindex(b"IDAT")
    length = struct.unpack(">I", data[i - 4 : i])[0]
    crc_at = i + 4 + length
    return data[:crc_at] + bytes([data[crc_at] ^ 0xFF]) + data[crc_at + 1 :]


def idat_garbage() -> bytes:
    return SIG + ihdr(16, 16) + chunk(b"IDAT", b"\x78\x9c" + b"\xff" * 64) + chunk(
        b"IEND", b"")


def idat_split_by_text() -> bytes:
    """Two IDAT chunks with a tEXt between them (PNG requires them consecutive)."""
    stream = zlib.compress(b"\0" * (1 + 32 * 3) * 32, 9)
    return (SIG + ihdr(32, 32) + chunk(b"IDAT", stream[:8]) + chunk(b"tEXt", b"a\0b")
            + chunk(b"IDAT", stream[8:]) + chunk(b"IEND", b""))


def chunk_length_overflow() -> bytes:
    data = small_png()
    return data[:33] + struct.pack(">I", 0xFFFFFFF0) + data[37:]


# ------------------------------------------------------------------ request builders


def part(name: str | bytes, value: bytes, filename: str | None = None,
         ctype: str | None = None, extra: bytes = b"") -> bytes:
    raw_name = name if isinstance(name, bytes) else name.encode()
    disp = b'Content-Disposition: form-data; name="' + raw_name + b'"'
    if filename is not None:
        disp += b'; filename="' + filename.encode() + b'"'
    head = disp + b"\r\n"
    if ctype is not None:
        head += f"Content-Type: {ctype}\r\n".encode()
    return head + extra + b"\r\n" + value


def multipart(parts: list[bytes], boundary: str = BOUNDARY, preamble: bytes = b"",
              epilogue: bytes = b"", close: bool = True) -> bytes:
    b = boundary.encode()
    out = [preamble] + [b"--" + b + b"\r\n" + p + b"\r\n" for p in parts]
    if close:
        out.append(b"--" + b + b"--\r\n" + epilogue)
    return b"".join(out)


def image_part(data: bytes, filename: str = "layer.png") -> bytes:
    return part("image", data, filename, "image/png")


def post(body: bytes, *, ctype: str | None = None, headers: list[tuple[str, str]] | None = None,
         content_length: int | None = None, auth: str | None = AUTH) -> bytes:
    h: list[tuple[str, str]] = []
    if auth is not None:
        h.append(("Authorization", auth))
    h.append(("Content-Type", ctype or f"multipart/form-data; boundary={BOUNDARY}"))
    h.append(("Content-Length", str(len(body) if content_length is None else content_length)))
    h += headers or []
    return request_bytes("POST", PATH, h, body)


def form(*fields: tuple[str, bytes], image: bytes | None = None, size: bytes = b"256x256"
         ) -> bytes:
    """A well-formed body: ``image`` (a small PNG by default), size, and ``fields``."""
    parts = [image_part(small_png() if image is None else image), part("size", size)]
    parts += [part(k, v) for k, v in fields]
    return multipart(parts)


def one(body: bytes, **kw: object) -> Callable[[], Parts]:
    return lambda: [post(body, **kw)]  # type: ignore[arg-type]


def lazy(body: Callable[[], bytes], **kw: object) -> Callable[[], Parts]:
    """Like :func:`one`, built only when the case runs (big bodies)."""
    return lambda: [post(body(), **kw)]  # type: ignore[arg-type]


def png_case(name: str, data: Callable[[], bytes], status: int, code: str | None,
             charged: int = 0) -> Case:
    return Case(name, lambda: [post(form(image=data()))], status,
                "image" if status != 200 else None, code, charged=charged)


# A body that parses (so multipart tricks are proven harmless) but is refused at n.
N0 = (("n", b"0"),)


def n0_case(name: str, body: Callable[[], bytes], ctype: str | None = None) -> Case:
    return Case(name, lambda: [post(body(), ctype=ctype)], 400, "n",
                "integer_below_min_value")


def bad_multipart(name: str, body: Callable[[], bytes], ctype: str | None = None) -> Case:
    return Case(name, lambda: [post(body(), ctype=ctype)], 400, None, "invalid_multipart")


def ten_mb_small_length() -> Parts:
    """Content-Length says 200 bytes; 10 MB follow (the rest smuggled as a 'next
    request'). Sent in pieces so the server can answer and close part-way."""
    body = form(*N0)
    head = post(body, content_length=200)
    return [head] + [b"X" * (1 << 20)] * 10


def slowloris_body() -> Parts:
    """Headers at once, then the body a few bytes at a time, past the read deadline
    (the corpus gateway runs with ``read_timeout_seconds: 2``)."""
    body = form()
    head = post(body)
    split = head.index(b"\r\n\r\n") + 4
    out: Parts = [head[:split]]
    for i in range(0, 40):
        out += [body[i * 4 : i * 4 + 4], 0.25]
    return out


def slow_headers_then_trickle() -> Parts:
    body = form()
    head = post(body)
    return [head[:30], 0.2, head[30:]]


CASES: list[Case] = [
    # --- multipart framing (all answered by the app in the envelope)
    bad_multipart("no-closing-boundary", lambda: multipart([image_part(small_png())],
                                                          close=False)),
    bad_multipart("empty-body", lambda: b""),
    bad_multipart("body-not-multipart", lambda: b"hello world, no boundaries here\r\n"),
    bad_multipart("boundary-mismatch",
                  lambda: multipart([image_part(small_png())], boundary="other-boundary")),
    bad_multipart("no-boundary-param", lambda: form(), ctype="multipart/form-data"),
    bad_multipart("empty-boundary-param", lambda: form(),
                  ctype="multipart/form-data; boundary="),
    bad_multipart("boundary-71-chars", lambda: multipart([image_part(small_png())], "b" * 71),
                  ctype="multipart/form-data; boundary=" + "b" * 71),
    bad_multipart("lf-only-line-endings", lambda: form().replace(b"\r\n", b"\n")),
    bad_multipart("part-without-headers",
                  lambda: multipart([b"\r\n" + small_png()])),
    bad_multipart("part-without-disposition",
                  lambda: multipart([b"Content-Type: image/png\r\n\r\n" + small_png()])),
    bad_multipart("thousand-part-headers", lambda: multipart(
        [part("image", small_png(), "a.png", extra=b"X-Pad: 1\r\n" * 1000)])),
    bad_multipart("64kb-part-header", lambda: multipart(
        [part("image", small_png(), "a.png", extra=b"X-Pad: " + b"p" * 65536 + b"\r\n")])),
    bad_multipart("header-without-colon", lambda: multipart(
        [part("image", small_png(), "a.png", extra=b"garbage line\r\n")])),
    Case("flood-of-parts", lazy(lambda: multipart([image_part(small_png())]
                                                  + [part("n", b"1")] * 50_000)),
         400, "n", "duplicate_parameter"),
    Case("unknown-part-name", one(form(("quality", b"hd"))), 400, "quality",
         "unknown_parameter"),
    Case("part-name-empty", one(form(("", b"x"))), 400, "", "unknown_parameter"),
    # Regression: the error message was a Python repr of a UnicodeDecodeError tuple.
    Case("part-name-non-utf8", one(multipart([image_part(small_png()),
                                              part(b"n\xff\xfe", b"1")])),
         400, None, "invalid_multipart"),
    Case("duplicate-size", one(form(("size", b"512x512"))), 400, "size",
         "duplicate_parameter"),
    Case("content-type-multipart-mixed", one(form(), ctype=f"multipart/mixed; boundary={BOUNDARY}"),
         400, None, "invalid_content_type"),
    Case("content-type-missing", lambda: [request_bytes("POST", PATH, [
        ("Authorization", AUTH), ("Content-Length", str(len(form()))), ], form())],
         400, None, "invalid_content_type"),
    # --- tricks that must parse, proven by reaching the n check
    n0_case("quoted-boundary-with-space", lambda: multipart(
        [image_part(small_png()), part("n", b"0")], boundary="a b'c()+_,-./:=?"),
        ctype="multipart/form-data; boundary=\"a b'c()+_,-./:=?\""),
    n0_case("preamble-and-epilogue", lambda: multipart(
        [image_part(small_png()), part("n", b"0")], preamble=b"ignore me\r\n" * 50,
        epilogue=b"trailing junk" * 50)),
    # A delimiter line followed by junk: RFC 2046 forbids the boundary in the data.
    bad_multipart("boundary-lookalike-in-image", lambda: multipart(
        [image_part(small_png() + b"\r\n--" + BOUNDARY.encode() + b"X"), part("n", b"0")])),
    n0_case("filename-path-traversal", lambda: multipart(
        [image_part(small_png(), "../../../../etc/passwd"), part("n", b"0")])),
    n0_case("filename-nul-and-crlf-escaped", lambda: multipart(
        [part("image", small_png(), "a%00b%0d%0aSet-Cookie: x", "text/html"),
         part("n", b"0")])),
    n0_case("part-content-type-octet-stream", lambda: multipart(
        [part("image", small_png(), "x", "application/octet-stream"), part("n", b"0")])),
    # --- field values
    Case("size-non-utf8", one(form(size=b"256x256\xff")), 400, "size", "invalid_value"),
    Case("user-non-utf8", one(form(("user", b"artist\xc3\x28"))), 400, "user",
         "invalid_value"),
    Case("user-header-injection-lf", one(form(("user", b"eve\nX-Admin: true"))), 400,
         "user", "invalid_value"),
    Case("user-nul-byte", one(form(("user", b"eve\x00root"))), 400, "user", "invalid_value"),
    Case("user-ansi-escape", one(form(("user", b"eve\x1b[31mred"))), 400, "user",
         "invalid_value"),
    Case("model-2kb", one(form(("model", b"m" * 2048))), 400, "model",
         "string_above_max_length"),
    Case("n-float", one(form(("n", b"1.5"))), 400, "n", "invalid_type"),
    Case("n-huge", one(form(("n", b"9" * 1000))), 400, "n", "integer_above_max_value"),
    Case("n-negative", one(form(("n", b"-1"))), 400, "n", "integer_below_min_value"),
    # Issue 19: Python's int() reads these as 10, 3 and 5; OpenAI answers 400.
    Case("n-underscore", one(form(("n", b"1_0"))), 400, "n", "invalid_type"),
    Case("n-arabic-indic-digit", one(form(("n", "\u0663".encode()))), 400, "n",
         "invalid_type"),
    Case("n-full-width-digit", one(form(("n", "\uff15".encode()))), 400, "n",
         "invalid_type"),
    Case("response-format-nul", one(form(("response_format", b"url\x00"))), 400,
         "response_format", "invalid_value"),
    # --- PNG payloads
    png_case("png-chunk-flood", chunk_flood, 400, "invalid_image"),
    png_case("png-ztxt-bomb", text_bomb, 400, "invalid_image"),
    png_case("png-iccp-bomb", iccp_bomb, 400, "invalid_image"),
    # Refused on every path (issue 19): far more pixel data than 16x16 holds, found
    # while inflating in pieces, so the 256 MiB never materialise.
    png_case("png-idat-bomb", idat_bomb, 400, "invalid_image"),
    png_case("apng", apng, 200, None, charged=1),
    png_case("apng-2g-frames", apng_bomb_frames, 200, None, charged=1),
    png_case("interlaced", interlaced_png, 200, None, charged=1),
    png_case("ihdr-zero-size", lambda: raw_png(0, 0, rows=b""), 400, "invalid_image"),
    png_case("ihdr-4097-square", lambda: huge_claim_tiny_data(4097), 400,
             "image_too_many_pixels"),
    png_case("ihdr-2g-square", lambda: huge_claim_tiny_data(0x7FFFFFFF), 400,
             "image_too_many_pixels"),
    png_case("ihdr-4096-tiny-idat", lambda: huge_claim_tiny_data(4096), 400,
             "invalid_image"),
    png_case("ihdr-bad-depth-for-rgb", lambda: raw_png(16, 16, depth=4), 400,
             "invalid_image"),
    png_case("ihdr-not-first", lambda: SIG + chunk(b"tEXt", b"a\0b") + small_png()[8:], 400,
             "invalid_image"),
    # Pillow reads a PLTE-less palette image as greyscale: lenient, and harmless.
    png_case("palette-without-plte", palette_without_plte, 200, None, charged=1),
    png_case("idat-crc-flipped", lambda: with_crc(small_png()), 400, "invalid_image"),
    png_case("idat-not-zlib", idat_garbage, 400, "invalid_image"),
    png_case("no-idat", lambda: SIG + ihdr(16, 16) + chunk(b"IEND", b""), 400,
             "invalid_image"),
    png_case("chunk-length-overflow", chunk_length_overflow, 400, "invalid_image"),
    # Issue 19: each was a 200 on the cached path (Pillow reads past them).
    png_case("idat-10-of-64-rows", lambda: raw_png(64, 64, rows=(b"\0" + b"\x80" * 192) * 10),
             400, "invalid_image"),
    png_case("two-ihdr", lambda: raw_png(32, 32, before_idat=ihdr(32, 32)), 400,
             "invalid_image"),
    png_case("unknown-critical-chunk", lambda: raw_png(32, 32, before_idat=chunk(b"EVIL", b"x")),
             400, "invalid_image"),
    png_case("idat-split-by-text", lambda: idat_split_by_text(), 400, "invalid_image"),
    png_case("signature-only", lambda: SIG, 400, "invalid_image"),
    png_case("zero-byte-image", lambda: b"", 400, "invalid_image_format"),
    png_case("cmyk-jpeg-renamed", lambda: jpeg("CMYK"), 400, "invalid_image_format"),
    png_case("jpeg-behind-png-signature", jpeg_behind_png_signature, 400, "invalid_image"),
    png_case("cmyk-jpeg-in-idat", cmyk_jpeg_in_idat, 400, "invalid_image"),
    # --- HTTP framing and sizes
    Case("declared-length-over-cap", one(form(), content_length=10 * 1024 * 1024),
         400, "image", "image_too_large"),
    Case("chunked-5mb-body", lambda: [request_bytes("POST", PATH, [
        ("Authorization", AUTH), ("Content-Type", f"multipart/form-data; boundary={BOUNDARY}"),
        ("Transfer-Encoding", "chunked")]) + b"".join(
            b"%x\r\n%s\r\n" % (len(c), c) for c in [multipart(
                [image_part(SIG + b"\0" * (5 << 20))])[i:i + 65536]
                for i in range(0, (5 << 20) + 200, 65536)] if c) + b"0\r\n\r\n"],
         400, "image", "image_too_large"),
    # aiohttp's parser meets the surplus as a garbage "next request" (often in the
    # same read as the first): a plain 400 and a close, or the app's 400.
    Case("10mb-body-small-content-length", ten_mb_small_length, 400, envelope=False,
         also=(413, None)),
    Case("unauthenticated-huge-body", one(form(), content_length=3 * 1024 * 1024, auth=None),
         401, None, None),
    Case("content-length-and-chunked", lambda: [request_bytes("POST", PATH, [
        ("Authorization", AUTH), ("Content-Type", f"multipart/form-data; boundary={BOUNDARY}"),
        ("Content-Length", "5"), ("Transfer-Encoding", "chunked")]) + b"0\r\n\r\n"],
         400, envelope=False, also=(None,)),
    Case("content-length-not-a-number", one(form(), content_length=-1), 400, envelope=False,
         also=(None,)),
    Case("header-obs-fold-injection", lambda: [post(form(), headers=[
        ("X-Note", "a\r\n X-Injected: yes")])], 400, envelope=False, also=(None,)),
    Case("header-nul-byte", lambda: [post(form(*N0), headers=[("X-Note", "a\x00b")])],
         400, envelope=False, also=(None,)),
    # Regression: a bearer token that is not UTF-8 crashed hashing it (500).
    Case("authorization-latin1-garbage", one(form(), auth="Bearer \xe9\xff\xfe"), 401, None,
         "invalid_api_key"),
    # The same non-UTF-8 token on the admin API (was a 500 there too).
    Case("admin-authorization-latin1-garbage", lambda: [request_bytes(
        "GET", "/admin/usage", [("Authorization", "Bearer \xe9\xff\xfe")])], 403, None,
         "admin_only"),
    # Regression (with the two below): aiohttp logged each of these with a traceback
    # at ERROR; test_only_accepted_cases_were_charged asserts a traceback-free log.
    Case("request-line-16kb", lambda: [request_bytes("POST", PATH + "?" + "q" * 16384,
                                                     [("Content-Length", "0")])],
         400, envelope=False, also=(414, 431, None)),
    Case("header-block-64kb", lambda: [post(form(), headers=[("X-Pad", "p" * 65536)])],
         400, envelope=False, also=(431, None)),
    # Regression: read_timeout_seconds was configured but never enforced.
    Case("slowloris-body", slowloris_body, 408, None, "request_timeout"),
    Case("slow-request-headers", slow_headers_then_trickle, 200, None, None, charged=1),
]


def by_name() -> dict[str, Case]:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)), "duplicate case names"
    return {c.name: c for c in CASES}
