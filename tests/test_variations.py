"""``POST /v1/images/variations`` through the official ``openai`` SDK, sync and async.

A real gateway process on a free port; the SDK points its ``base_url`` at it, exactly as
the README tells users to.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
from PIL import Image
from support import (
    ADMIN_TOKEN,
    TOKENS,
    GatewayProcess,
    auth,
    base_config,
    png_bytes,
    start_gateway,
)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("variations")
    g = start_gateway(base_config(tmp), tmp)
    yield g
    g.stop()


def sdk(gateway: GatewayProcess, token: str | None = TOKENS["alice"]) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=token or "", max_retries=0)


def source_png(size: int = 1024) -> bytes:
    return png_bytes(size, "RGB", seed=3)


def test_sdk_sync_urls_download_as_1024_pngs(gateway: GatewayProcess) -> None:
    resp = sdk(gateway).images.create_variation(
        image=("otter.png", source_png(), "image/png"), n=3, size="1024x1024")
    assert isinstance(resp.created, int) and resp.created > 0
    assert len(resp.data) == 3
    digests = set()
    for item in resp.data:
        assert item.url and item.url.startswith(gateway.url + "/v1/images/files/")
        with urllib.request.urlopen(item.url) as r:
            assert r.headers["Content-Type"] == "image/png"
            body = r.read()
        assert Image.open(io.BytesIO(body)).size == (1024, 1024)
        digests.add(body)
    assert len(digests) == 3, "variations must differ from each other"


def test_sdk_sync_b64_json_at_512(gateway: GatewayProcess) -> None:
    resp = sdk(gateway).images.create_variation(
        image=("source.png", source_png(), "application/octet-stream"), n=2, size="512x512",
        response_format="b64_json", user="artist-7")
    assert len(resp.data) == 2
    for item in resp.data:
        assert item.url is None
        img = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert img.format == "PNG" and img.size == (512, 512)
    assert resp._request_id and resp._request_id.startswith("req_")  # x-request-id


async def test_sdk_async_urls_and_b64(gateway: GatewayProcess) -> None:
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=TOKENS["bob"],
                                max_retries=0)
    async with client:
        urls = await client.images.create_variation(
            image=("a.png", source_png()), n=3, size="1024x1024")
        b64 = await client.images.create_variation(
            image=("a.png", source_png()), n=2, size="512x512", response_format="b64_json")
        assert len(urls.data) == 3 and all(d.url for d in urls.data)
        async with aiohttp.ClientSession() as http, http.get(urls.data[0].url) as r:
            body = await r.read()
    assert Image.open(io.BytesIO(body)).size == (1024, 1024)
    sizes = {Image.open(io.BytesIO(base64.b64decode(d.b64_json))).size for d in b64.data}
    assert sizes == {(512, 512)}


def test_defaults_when_fields_missing(gateway: GatewayProcess) -> None:
    """No n, size or format sent: one 1024x1024 image as a URL (the contract's defaults)."""
    resp = sdk(gateway).images.create_variation(image=("a.png", png_bytes(256)))
    assert len(resp.data) == 1 and resp.data[0].url
    with urllib.request.urlopen(resp.data[0].url) as r:
        assert Image.open(io.BytesIO(r.read())).size == (1024, 1024)


@pytest.mark.parametrize("mode", ["P", "L", "LA", "RGBA", "I;16", "1"])
def test_palette_grey_16bit_alpha_inputs_are_accepted(gateway: GatewayProcess, mode: str
                                                      ) -> None:
    data = png_bytes(128, mode if mode != "I;16" else "L")
    if mode == "I;16":
        img = Image.open(io.BytesIO(data)).convert("I;16")
        buf = io.BytesIO()
        img.save(buf, "PNG")
        data = buf.getvalue()
        assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    resp = sdk(gateway).images.create_variation(image=("a.png", data), size="256x256",
                                                response_format="b64_json")
    img = Image.open(io.BytesIO(base64.b64decode(resp.data[0].b64_json)))
    assert img.size == (256, 256)


def test_model_accepts_dalle2_and_backend_names(gateway: GatewayProcess) -> None:
    client = sdk(gateway)
    for model in ("dall-e-2", "local"):
        resp = client.images.create_variation(image=("a.png", png_bytes(64)), model=model,
                                              size="256x256", response_format="b64_json")
        assert len(resp.data) == 1


# ----------------------------------------------------------------------- bad input


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(
        ">I", zlib.crc32(kind + body))


def claimed_png(width: int, height: int) -> bytes:
    """A ~1 KB PNG whose header claims ``width`` x ``height`` (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 4096, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(
        b"IEND", b"")


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, "JPEG")
    return buf.getvalue()


TOO_BIG = b"\x89PNG\r\n\x1a\n" + b"\0" * (4 * 1024 * 1024 + 1 - 8)

# (case id, create_variation kwargs, status, param, code, SDK exception class)
BAD_INPUTS = [
    ("not-png", {"image": ("a.png", b"GIF89a" + b"\0" * 100)}, 400, "image",
     "invalid_image_format", openai.BadRequestError),
    ("empty-file", {"image": ("a.png", b"")}, 400, "image", "invalid_image_format",
     openai.BadRequestError),
    ("truncated-png", {"image": ("a.png", png_bytes(64)[:-30])}, 400, "image",
     "invalid_image", openai.BadRequestError),
    ("jpeg-renamed", {"image": ("photo.png", jpeg_bytes(), "image/png")}, 400, "image",
     "invalid_image_format", openai.BadRequestError),
    ("not-square", {}, 400, "image",
     "invalid_image_dimensions", openai.BadRequestError),
    ("too-big-4mb+1", {"image": ("a.png", TOO_BIG)}, 400, "image", "image_too_large",
     openai.BadRequestError),
    ("decompression-bomb", {"image": ("a.png", claimed_png(50000, 50000))}, 400, "image",
     "image_too_many_pixels", openai.BadRequestError),
    ("n-abc", {"n": "abc"}, 400, "n", "invalid_type", openai.BadRequestError),
    ("n-0", {"n": 0}, 400, "n", "integer_below_min_value", openai.BadRequestError),
    ("n-11", {"n": 11}, 400, "n", "integer_above_max_value", openai.BadRequestError),
    ("size-300", {"size": "300x300"}, 400, "size", "invalid_value", openai.BadRequestError),
    ("format-bad", {"response_format": "jpeg"}, 400, "response_format", "invalid_value",
     openai.BadRequestError),
    ("model-unknown", {"model": "gpt-image-1"}, 400, "model", "model_not_found",
     openai.BadRequestError),
    ("unknown-field", {"extra_body": {"quality": "hd"}}, 400, "quality",
     "unknown_parameter", openai.BadRequestError),
    ("user-10kb", {"user": "u" * 10 * 1024}, 400, "user", "string_above_max_length",
     openai.BadRequestError),
    ("user-control-chars", {"user": "bob\r\nX-Injected: 1"}, 400, "user", "invalid_value",
     openai.BadRequestError),
]


def _not_square() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (640, 480), "blue").save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(("case", "kwargs", "status", "param", "code", "exc"), BAD_INPUTS,
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(gateway: GatewayProcess, case: str, kwargs: dict, status: int,
                   param: str, code: str, exc: type[Exception]) -> None:
    args = {"image": ("a.png", png_bytes(64)), "size": "256x256", **kwargs}
    if case == "not-square":
        args["image"] = ("a.png", _not_square())
    with pytest.raises(exc) as info:
        sdk(gateway).images.create_variation(**args)
    err = info.value
    assert isinstance(err, openai.APIStatusError)
    assert err.status_code == status
    body = err.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == param
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert err.response.headers["x-should-retry"] == "false"
    assert err.response.headers["x-request-id"].startswith("req_")
    if case == "not-square":
        assert "got 640x480 instead" in body["error"]["message"]


MULTIPART = {"headers": {"Content-Type": "multipart/form-data"}}


def test_missing_image_part(gateway: GatewayProcess) -> None:
    body = (b"--xyz\r\nContent-Disposition: form-data; name=\"n\"\r\n\r\n1\r\n--xyz--\r\n")
    req = urllib.request.Request(gateway.url + "/v1/images/variations", data=body, headers={
        "Content-Type": "multipart/form-data; boundary=xyz",
        "Authorization": f"Bearer {TOKENS['alice']}"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req)
    assert info.value.code == 400
    error = json.loads(info.value.read())["error"]
    assert (error["param"], error["code"]) == ("image", "missing_required_parameter")
    assert error["message"] == "'image' is a required property"


def test_two_image_parts(gateway: GatewayProcess) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk(gateway).post("/images/variations", cast_to=object, body={"n": "1"},
                          files=[("image", ("a.png", png_bytes(64))),
                                 ("image", ("b.png", png_bytes(64, seed=2)))],
                          options=MULTIPART)
    error = info.value.response.json()["error"]
    assert (error["param"], error["code"]) == ("image", "duplicate_parameter")


def test_auth_errors_use_the_contract_messages(gateway: GatewayProcess) -> None:
    with pytest.raises(openai.AuthenticationError) as info:  # no Authorization header
        sdk(gateway, token="unused").images.create_variation(
            image=("a.png", png_bytes(64)), extra_headers={"Authorization": openai.omit})
    assert "authorization" not in {k.lower() for k in info.value.response.request.headers}
    assert "didn't provide an API key" in info.value.message
    assert info.value.code is None
    wrong = "vg-definitely-not-a-member-token-1234567890"
    with pytest.raises(openai.AuthenticationError) as info:
        sdk(gateway, token=wrong).images.create_variation(image=("a.png", png_bytes(64)))
    assert info.value.code == "invalid_api_key"
    assert wrong not in info.value.response.text
    assert wrong[3:12] not in info.value.response.text
    assert wrong not in gateway.log()
    with pytest.raises(openai.AuthenticationError):  # the admin token is not a member token
        sdk(gateway, token=ADMIN_TOKEN).images.create_variation(image=("a.png",
                                                                       png_bytes(64)))


def test_no_5xx_and_no_secrets_in_logs(gateway: GatewayProcess) -> None:
    """Runs last in this module: nothing above produced a 5xx or leaked a token."""
    log = gateway.log()
    assert '"status": 5' not in log
    for token in (*TOKENS.values(), ADMIN_TOKEN):
        assert token not in log


def test_content_type_must_be_multipart(gateway: GatewayProcess) -> None:
    req = urllib.request.Request(gateway.url + "/v1/images/variations", data=b'{"n": 1}',
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {TOKENS['alice']}"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req)
    assert info.value.code == 400
    assert b"multipart/form-data" in info.value.read()


def test_unknown_route_is_an_openai_404(gateway: GatewayProcess) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(gateway.url + "/v1/images/generations")
    assert info.value.code == 404
    assert info.value.headers["x-request-id"].startswith("req_")
    assert json.loads(info.value.read())["error"]["code"] == "not_found"


def test_readme_snippet_runs(gateway: GatewayProcess, tmp_path: Path) -> None:
    """The README's SDK snippet, as written there, against a running gateway."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("```python\n") + len("```python\n")
    snippet = readme[start:readme.index("```", start)]
    (tmp_path / "image.png").write_bytes(source_png())
    snippet = snippet.replace("http://127.0.0.1:8080", gateway.url).replace(
        '"any"', repr(TOKENS["alice"]))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(snippet, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    assert len(list(tmp_path.glob("variation-*.png"))) == 2


async def test_no_store_refuses_corrupt_pixel_data_and_checks_an_upload_once(
        gateway_client, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """no-store never decodes, but a plain PNG whose pixel data is broken is still the
    400 the cached path gives (not a backend's 500 the SDK would retry); good bytes are
    inflated once, then remembered."""
    from test_png import framed, rgb_ihdr

    from gateway import png

    calls: list[int] = []
    real = png.check_pixel_data

    def counted(data: bytes, info: png.PngInfo) -> None:
        calls.append(len(data))
        real(data, info)

    monkeypatch.setattr(png, "check_pixel_data", counted)
    client = await gateway_client()
    no_store = {**auth(), "Cache-Control": "no-store"}

    async def post(image: bytes) -> aiohttp.ClientResponse:
        form = aiohttp.FormData()
        form.add_field("image", image, filename="a.png", content_type="image/png")
        form.add_field("size", "256x256")
        return await client.post("/v1/images/variations", data=form, headers=no_store)

    corrupt = framed(rgb_ihdr(64, 64), zlib.compress(b"\0" * 100))  # rows missing
    for _ in range(2):
        r = await post(corrupt)
        assert r.status == 400
        err = (await r.json())["error"]
        assert (err["param"], err["code"]) == ("image", "invalid_image")
    assert len(calls) == 2  # a failed check is not remembered
    good = png_bytes(64)
    for _ in range(3):
        r = await post(good)
        assert r.status == 200 and r.headers["X-Cache"] == "BYPASS"
    assert len(calls) == 3


def _corrupt_uploads() -> dict[str, bytes]:
    """Issue 19, item 5: uploads each path used to judge differently."""
    from test_png import chunk as png_chunk
    from test_png import framed, rgb_ihdr

    rows = (b"\0" + bytes(range(192))) * 64
    ihdr, idat = png_chunk(b"IHDR", rgb_ihdr(64, 64)), png_chunk(b"IDAT", zlib.compress(rows))
    iend = png_chunk(b"IEND", b"")
    return {
        "10-of-64-rows": framed(rgb_ihdr(64, 64), zlib.compress(rows[:193 * 10])),
        "two-ihdr": b"\x89PNG\r\n\x1a\n" + ihdr + ihdr + idat + iend,
        "unknown-critical-chunk": (b"\x89PNG\r\n\x1a\n" + ihdr + png_chunk(b"QQQQ", b"?")
                                   + idat + iend),
    }


@pytest.mark.parametrize("case", list(_corrupt_uploads()))
async def test_a_corrupt_upload_is_a_400_on_every_path(gateway_client, case: str
                                                       ) -> None:  # type: ignore[no-untyped-def]
    """Cached path, no-store, a repeated no-store and the cached path again: the same
    400, and nothing charged (the README: a corrupt upload is never sent upstream)."""
    client = await gateway_client()
    image = _corrupt_uploads()[case]
    for policy in ("no-store", None, "no-store", None, "no-cache"):
        form = aiohttp.FormData()
        form.add_field("image", image, filename="a.png", content_type="image/png")
        form.add_field("size", "256x256")
        headers = {**auth(), **({"Cache-Control": policy} if policy else {})}
        r = await client.post("/v1/images/variations", data=form, headers=headers)
        assert r.status == 400, (policy, await r.text())
        err = (await r.json())["error"]
        assert (err["param"], err["code"]) == ("image", "invalid_image"), policy
    usage = await (await client.get("/v1/usage", headers=auth())).json()
    assert usage["limits"]["images_per_day"]["used"] == 0
