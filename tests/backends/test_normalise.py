"""Normalising upstream answers (``gateway.backends.normalise.to_png``): fast, and the same
picture as before.

Quality: the result is compared with what ``to_png`` did before the speed-up (a full
decode and ``ImageOps.fit`` with Lanczos, ``perf.bench_normalise.lanczos_reference``)
on the same upstream bytes. Tolerance, per comparison: PSNR >= 38 dB and a mean
absolute difference <= 1.5 of 255 levels per channel. Differences at that level are
not visible side by side; measured on these pictures: 41.3 dB and 1.03 levels at worst
(the lowest for 1024 -> 512 from a JPEG of the detailed picture, where the JPEG is
decoded at half scale instead of in full and resampled). Timing: turning answers into
PNGs is gateway time, not backend time (checked with a moved clock, no timing asserts).
"""

from __future__ import annotations

import asyncio
import io
import math
import time

import pytest
from instrumented_backend import register, vary
from perf.bench_normalise import encode, lanczos_reference, photo
from PIL import Image, ImageChops, ImageStat
from support import png_bytes

from gateway import png
from gateway.backends import normalise
from gateway.backends.base import BackendError
from gateway.backends.normalise import encode_png, to_png, to_pngs
from gateway.generation import Generation, VariationRequest, normalise_clock
from gateway.keys import LIVE, METRICS

MIN_PSNR_DB = 38.0
MAX_MEAN_ABS_LEVELS = 1.5


def difference(got: Image.Image, want: Image.Image) -> tuple[float, float]:
    """``(psnr_db, mean absolute difference in levels)`` over all channels."""
    assert got.size == want.size and got.mode == want.mode
    stat = ImageStat.Stat(ImageChops.difference(got, want))
    mse = sum(rms * rms for rms in stat.rms) / len(stat.rms)
    psnr = math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)
    return psnr, sum(stat.mean) / len(stat.mean)


@pytest.fixture(scope="module")
def pictures() -> dict[str, Image.Image]:
    return {
        # The bench fake's answer: smooth, with fractal edges and sensor-like noise.
        "photo": photo(),
        # The same without the blur: fine detail down to single pixels.
        "detailed": photo(blur=0, seed=1),
        # gpt-image's landscape size: fitted by a centred crop.
        "landscape": photo(1536, seed=2).crop((0, 256, 1536, 1280)),
    }


@pytest.mark.parametrize("fmt,quality", [("png", 100), ("jpeg", 100), ("jpeg", 85),
                                         ("webp", 85)])
@pytest.mark.parametrize("size", [256, 512])
@pytest.mark.parametrize("picture", ["photo", "detailed", "landscape"])
def test_fitted_answer_matches_the_lanczos_fit(
        pictures: dict[str, Image.Image], picture: str, fmt: str, quality: int,
        size: int) -> None:
    data = encode(pictures[picture], fmt, quality)
    out = to_png("b", data, size)
    with Image.open(io.BytesIO(out)) as got:
        assert got.format == "PNG" and got.size == (size, size)
        got.load()
        psnr, mean_abs = difference(got, lanczos_reference(data, size))
    assert psnr >= MIN_PSNR_DB, (picture, fmt, quality, size, psnr)
    assert mean_abs <= MAX_MEAN_ABS_LEVELS, (picture, fmt, quality, size, mean_abs)


def test_a_jpeg_of_the_requested_size_is_only_converted() -> None:
    img = photo(256)
    data = encode(img, "jpeg", 90)
    with Image.open(io.BytesIO(to_png("b", data, 256))) as got:
        got.load()
        with Image.open(io.BytesIO(data)) as want:
            assert difference(got, want.convert("RGB"))[0] == math.inf


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
@pytest.mark.parametrize("width,height", [(1, 1), (1, 7), (9, 1), (64, 64), (333, 333), (333, 129)])
def test_encode_png_is_lossless_and_passes_the_strict_reader(
        mode: str, width: int, height: int) -> None:
    img = photo(max(width, height), noise=30).crop((0, 0, width, height)).convert(mode)
    if mode == "RGBA":
        img.putalpha(Image.linear_gradient("L").resize((width, height)))
    data = encode_png(img)
    if width == height:  # the gateway's own reader (of uploads) takes only squares
        png.check_pixel_data(data, png.inspect(data))  # every row inflates in full
    with Image.open(io.BytesIO(data)) as got:
        assert got.format == "PNG" and got.mode == mode and got.size == (width, height)
        assert got.tobytes() == img.tobytes()


def test_encode_png_is_no_bigger_than_pillows_fast_setting() -> None:
    """Speed is not bought with size: a photo-like picture is at most Pillow's
    ``compress_level=1`` size, and a flat one (run-length path) shrinks ~10x or more."""
    from PIL import ImageDraw

    picture = photo(512)
    buf = io.BytesIO()
    picture.save(buf, "PNG", compress_level=1)
    assert len(encode_png(picture)) <= len(buf.getvalue())
    flat = Image.new("RGB", (512, 512), (240, 240, 250))
    ImageDraw.Draw(flat).ellipse((100, 100, 400, 400), fill=(200, 50, 50))
    data = encode_png(flat)
    assert len(data) * 10 <= 512 * 512 * 3
    with Image.open(io.BytesIO(data)) as got:
        assert got.tobytes() == flat.tobytes()


def test_transparency_survives_the_fit() -> None:
    img = photo(1024).convert("RGBA")
    img.putalpha(Image.radial_gradient("L").resize((1024, 1024)))
    data = encode(img, "png")
    with Image.open(io.BytesIO(to_png("b", data, 256))) as got:
        got.load()
        assert got.mode == "RGBA"
        psnr, mean_abs = difference(got, lanczos_reference(data, 256))
    assert psnr >= MIN_PSNR_DB and mean_abs <= MAX_MEAN_ABS_LEVELS


def test_broken_answers_are_still_the_upstreams_failure() -> None:
    jpeg = encode(photo(256), "jpeg", 90)
    for data in (jpeg[: len(jpeg) // 2], b"GIF89a" + bytes(64), b"not an image"):
        with pytest.raises(BackendError) as err:
            to_png("b", data, 128)
        assert err.value.status == 502 and "'b'" in err.value.message


# --------------------------------------------------------------------------- timing


@pytest.fixture
def slow_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """``time.perf_counter`` moved 100 s forward by every ``to_png`` call."""
    offset = [0.0]
    real_clock, real_to_png = time.perf_counter, normalise.to_png

    def to_png_taking_100_s(name: str, data: bytes, size: int) -> bytes:
        offset[0] += 100.0
        return real_to_png(name, data, size)

    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + offset[0])
    monkeypatch.setattr(normalise, "to_png", to_png_taking_100_s)
    return offset


async def test_nested_clocks_each_count_the_conversion(slow_clock: list[float]) -> None:
    image = png_bytes(32)
    with normalise_clock() as outer:
        await to_pngs("b", [image], 16)
        with normalise_clock() as inner:
            # Tasks started inside the block count too (backends gather their calls).
            await asyncio.gather(*(to_pngs("b", [image], 16) for _ in range(2)))
    assert inner.seconds >= 200 and outer.seconds >= 300
    await to_pngs("b", [image], 16)  # no clock: nothing to count, no error


async def test_conversion_is_overhead_not_backend_time(
        gateway_client, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
        slow_clock: list[float]) -> None:
    start = register(monkeypatch, gateway_client)
    client, backend = await start()
    original = backend.generate

    async def generate_then_convert(request: VariationRequest) -> Generation:
        # What the HTTP backends do: the upstream's answer, then to_pngs.
        answer = await original(request)
        return Generation(await to_pngs(backend.name, answer.images, request.size))

    monkeypatch.setattr(backend, "generate", generate_then_convert)
    answer = await vary(client, png_bytes(seed=3))
    assert answer.status == 200
    registry = client.app[METRICS].registry
    route = {"route": "/v1/images/variations"}

    def total(name: str, labels: dict[str, str]) -> float:
        return registry.get_sample_value(f"variations_gateway_{name}_sum", labels) or 0.0

    assert total("request_overhead_seconds", route) >= 100
    assert total("backend_normalise_seconds", {"backend": "inst"}) >= 100
    assert total("backend_request_duration_seconds", {"backend": "inst"}) < 50
    assert client.app[LIVE].current.router.backends["inst"] is backend
