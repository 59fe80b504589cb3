"""Reading the multipart form: the gateway reads what the :mod:`multipart` parser reads
(or refuses with a 400), real clients' bodies are read whole, and a body sent whole or
chunked gets the same answer."""

from __future__ import annotations

import gzip
import random
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import multipart
import openai
import pytest
from aiohttp import web
from support import auth, multipart_body, png_bytes

from gateway.errors import ApiError
from gateway.png import MAX_UPLOAD_BYTES
from gateway.upload import MAX_PARTS, split_parts

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins" / "gimp" / "generate-variations"))
sys.path.insert(0, str(ROOT / "tests" / "robustness"))

import vg_multipart  # noqa: E402
from hostile_corpus import BOUNDARY, image_part, part  # noqa: E402
from hostile_corpus import multipart as framed  # noqa: E402

B = "bench-boundary-0123456789"
PNG = png_bytes(32, seed=5)


def parser_parts(body: bytes, boundary: str) -> list[tuple[str, bytes]]:
    """What the library parser reads from ``body`` in one chunk (raises if it refuses)."""
    parser = multipart.PushMultipartParser(boundary, max_segment_count=MAX_PARTS, strict=True)
    parts: list[tuple[str, bytes]] = []
    for chunk in (body, b""):
        for event in parser.parse(chunk):
            if isinstance(event, multipart.MultipartSegment):
                parts.append((event.name or "", b""))
            elif event is not None:
                parts[-1] = (parts[-1][0], parts[-1][1] + event)
    return parts


def agrees(body: bytes, boundary: str = B) -> bool:
    """Whether the gateway took ``body``; asserts it read what the parser reads, and that
    a refusal is a 400 (never an error that would be a 500)."""
    try:
        read = split_parts(body, boundary)
    except ApiError as exc:
        assert exc.status == 400, body[:300]
        return False
    parsed = parser_parts(body, boundary)
    assert read == dict(parsed) and len(parsed) == len(read), body[:300]
    return True


def boundary_of(content_type: str) -> str:
    return multipart.parse_options_header(content_type)[1]["boundary"]


@pytest.fixture
async def captured(aiohttp_server: Any) -> AsyncIterator[tuple[str, list[tuple[str, bytes]]]]:
    """A server that keeps each POST's Content-Type and body and answers like OpenAI."""
    seen: list[tuple[str, bytes]] = []

    async def keep(request: web.Request) -> web.Response:
        seen.append((request.headers["Content-Type"], await request.read()))
        return web.json_response({"created": 1, "data": [{"url": "http://x/a.png"}]})

    app = web.Application()
    app.router.add_post("/v1/images/variations", keep)
    server = await aiohttp_server(app)
    yield str(server.make_url("/v1")), seen


async def test_real_clients_bodies_are_read_whole(
        captured: tuple[str, list[tuple[str, bytes]]]) -> None:
    base, seen = captured
    sdk = openai.AsyncOpenAI(base_url=base, api_key="k", max_retries=0)
    await sdk.images.create_variation(image=("layer.png", PNG, "image/png"), n=2,
                                      size="512x512", response_format="url",
                                      user="artist-7", model="dall-e-2")
    await sdk.images.create_variation(image=PNG)  # bytes without a file name
    form = aiohttp.FormData()
    form.add_field("n", "3")
    form.add_field("image", PNG, filename="a.png", content_type="image/png")
    async with aiohttp.ClientSession() as session, session.post(
            base + "/images/variations", data=form) as r:
        assert r.status == 200
    bodies = list(seen)
    body, ctype = vg_multipart.build_multipart(
        {"n": "4", "size": "256x256", "response_format": "b64_json", "user": "ann"},
        [("image", "layer.png", "image/png", PNG)])
    bodies += [(ctype, body), (f"multipart/form-data; boundary={B}",
                               multipart_body({"n": "1"}, PNG, B))]
    assert len(bodies) == 5
    for ctype, body in bodies:
        boundary = boundary_of(ctype)
        assert agrees(body, boundary), body[:400]
        assert split_parts(body, boundary)["image"] == PNG


def test_hand_made_framings_are_read_as_the_parser_reads_them() -> None:
    """Hand-made framings: the gateway reads exactly what the parser reads, or refuses
    with a 400 (the parser's refusal, a duplicate, an unknown name); never a 500.

    (These cases once checked a hand-written fast path against the parser; issue 20
    removed it: the verdicts are now the gateway's, through the parser only.)"""
    img = image_part(PNG)
    cases = {
        "plain": (framed([img, part("n", b"2")]), True),
        "empty value": (framed([img, part("user", b"")]), True),
        "epilogue": (framed([img], epilogue=b"junk\r\n--x"), True),
        "seven parts": (framed([img] + [part("n", b"1")] * 6), False),  # duplicate n
        "eight parts": (framed([img] + [part("n", b"1")] * 7), False),
        "preamble": (framed([img], preamble=b"hello\r\n"), True),
        "percent name": (framed([img, part("n%22", b"1")]), False),
        "escaped quote": (framed([img, part(b'n\\"x', b"1")]), False),
        "unquoted name": (framed([img, b"Content-Disposition: form-data; name=n\r\n\r\n1"]),
                          True),
        "lowercase headers": (framed([b'content-disposition: form-data; name="n"\r\n'
                                      b"content-type: text/plain\r\n\r\n1"]), True),
        "extra header": (framed([part("image", PNG, "a.png", extra=b"X-Pad: 1\r\n")]), True),
        "part length": (framed([part("n", b"1", extra=b"Content-Length: 1\r\n")]), True),
        "continuation": (framed([b'Content-Disposition: form-data;\r\n name="n"\r\n\r\n1']),
                         False),
        "two dispositions": (framed([b'Content-Disposition: form-data; name="n"\r\n'
                                     b'Content-Disposition: form-data; name="size"\r\n\r\n1']),
                             True),
        "type with options": (framed([part("n", b"1", None, "text/plain; charset=utf-8")]),
                              True),
        "type not ascii": (framed([part("n", b"1", None, "text/pl\u00e4in")]), True),
        "no headers": (framed([b"\r\n" + PNG]), False),
        "non-utf8 name": (framed([part(b"n\xff", b"1")]), False),
        "lf only": (framed([img]).replace(b"\r\n", b"\n"), False),
        "no closing": (framed([img], close=False), False),
        "lookalike": (framed([image_part(PNG + b"\r\n--" + BOUNDARY.encode() + b"X")]), False),
        "other boundary": (framed([img], boundary="other"), False),
    }
    for name, (body, taken) in cases.items():
        assert agrees(body, BOUNDARY) is taken, name


def test_mutated_bodies_are_read_as_the_parser_reads_them_or_refused() -> None:
    """Random byte edits of an SDK-shaped body, mostly near the framing: whatever the
    gateway accepts, the parser reads the same; whatever it refuses is a 400."""
    rng = random.Random(7)
    base = framed([image_part(png_bytes(8, seed=1)), part("n", b"2"), part("user", b"ann")])
    marks = [i for i in range(len(base)) if base[i:i + 2] in (b"\r\n", b'"', b"--", b";")]
    taken = refused = 0
    for _ in range(4000):
        body = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            if not body:
                break
            at = rng.choice(marks) + rng.randint(-3, 3) if rng.random() < 0.8 else \
                rng.randrange(len(body))
            at = max(0, min(len(body) - 1, at))
            kind = rng.random()
            if kind < 0.4:
                body[at] = rng.choice(b'\r\n-";:= aZ%\\\x00\xff')
            elif kind < 0.7:
                del body[at]
            elif kind < 0.9:
                body.insert(at, rng.choice(b'\r\n-";:= aZ%\\'))
            else:
                del body[at:]
        if agrees(bytes(body), BOUNDARY):
            taken += 1
        else:
            refused += 1
    assert taken > 100 and refused > 100  # both verdicts were exercised


@pytest.mark.parametrize(("fields", "epilogue", "status", "code"), [
    ({"n": "2"}, b"", 200, None),
    # Streamed, an epilogue in a later chunk than the closing boundary was refused.
    ({"n": "2"}, b"trailing junk" * 1000, 200, None),
    ({"n": "2", "quality": "hd"}, b"", 400, "unknown_parameter"),
    ({"n": "0"}, b"", 400, "integer_below_min_value"),
])
async def test_whole_and_chunked_bodies_get_the_same_answer(
        gateway_client: Any, fields: dict[str, str], epilogue: bytes, status: int,
        code: str | None) -> None:
    client = await gateway_client()
    body = multipart_body(fields, PNG, B) + epilogue
    headers = {**auth(), "Content-Type": f"multipart/form-data; boundary={B}"}

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 1000):
            yield body[i:i + 1000]

    answers = []
    for data in (body, chunks()):
        async with client.post("/v1/images/variations", data=data, headers=headers) as r:
            answers.append((r.status, (await r.json()).get("error", {}).get("code")))
    assert answers == [(status, code)] * 2


@pytest.mark.parametrize(("epilogue", "status", "code"), [
    (0, 200, None),
    (400_000, 400, "image_too_large"),  # inflates past the cap: refused while it arrives
    (2_000_000, 400, "image_too_large"),  # past client_max_size too: still ours, no 413
])
async def test_a_gzip_body_is_capped_by_its_inflated_size(
        gateway_client: Any, epilogue: int, status: int, code: str | None) -> None:
    """aiohttp inflates ``Content-Encoding: gzip`` bodies: a few KB on the wire can be
    megabytes. Read whole, such a body used to be a 200 past the cap, or a 413."""
    client = await gateway_client()
    image = PNG if not epilogue else PNG + b"\0" * (MAX_UPLOAD_BYTES - 10 - len(PNG))
    body = multipart_body({"n": "1"}, image, B) + b"\0" * epilogue
    headers = {**auth(), "Content-Type": f"multipart/form-data; boundary={B}",
               "Content-Encoding": "gzip"}
    async with client.post("/v1/images/variations", data=gzip.compress(body),
                           headers=headers) as r:
        answer = (r.status, (await r.json()).get("error", {}).get("code"))
    assert answer == (status, code)


@pytest.mark.parametrize(("value", "code"), [
    ("1_0", "invalid_type"),            # int() reads 10
    ("\u0663", "invalid_type"),         # Arabic-Indic three
    ("\uff15", "invalid_type"),         # full-width five
    ("\u00a05", "invalid_type"),        # a non-ASCII space around ASCII digits
    ("1\u0660", "invalid_type"),        # ASCII then Arabic-Indic zero
    (" 3 ", None), ("+2", None), ("07", None),
    ("-1", "integer_below_min_value"), ("11", "integer_above_max_value"),
])
def test_n_takes_only_ascii_digits(value: str, code: str | None) -> None:
    """Issue 19, item 6: OpenAI answers 400 (param n) to what int() would also take."""
    from gateway.errors import ApiError
    from gateway.upload import validate

    fields = {"n": value.encode()}
    if code is None:
        assert validate(PNG, fields, frozenset({"dall-e-2"})).n == int(value)
        return
    with pytest.raises(ApiError) as info:
        validate(PNG, fields, frozenset({"dall-e-2"}))
    assert (info.value.status, info.value.param, info.value.code) == (400, "n", code)
