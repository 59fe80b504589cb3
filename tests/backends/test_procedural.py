"""The embedded ``procedural`` backend: shape, determinism, likeness and lifecycle."""

from __future__ import annotations

import asyncio
import io
import itertools
import math
import os
import random
import threading
from collections.abc import AsyncIterator
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import pytest
from PIL import Image, ImageChops, ImageDraw, ImageOps, ImageStat
from support import eventually

from gateway.backends import create_backend
from gateway.backends.base import BackendError
from gateway.backends.procedural import ProceduralBackend, ProceduralOptions, recipe
from gateway.backends.procedural.recipe import make_variation, make_variations, prepare_source
from gateway.generation import SourceImage, VariationRequest

# A correlation of 32x32 grey thumbnails: independent images score ~0 with a standard
# deviation of ~1/32 = 0.03 (1024 samples), so 0.3 is ~10 sigma above chance, while a
# variation that keeps the layout and the light/dark structure scores well above it
# (0.6-0.98 measured on the scene below at strength 0.5, 0.37 at worst at strength 1).
LIKENESS = 0.3
# Mean absolute difference per channel (0..255) that counts as a visibly different image.
DISTINCT = 2.0


def scene(edge: int = 512, *, transparent_corner: bool = False) -> Image.Image:
    """A small landscape: sky gradient, ground, sun, a house and some text."""
    image = Image.new("RGBA", (edge, edge))
    draw = ImageDraw.Draw(image)
    for y in range(edge):
        draw.line((0, y, edge, y), fill=(90 + y * 100 // edge, 150 + y * 80 // edge, 230))
    e = edge
    draw.rectangle((0, e * 0.7, e, e), fill=(70, 140, 50))
    draw.ellipse((e * 0.6, e * 0.1, e * 0.85, e * 0.35), fill=(255, 220, 60))
    draw.rectangle((e * 0.15, e * 0.4, e * 0.45, e * 0.75), fill=(180, 60, 40))
    draw.polygon([(e * 0.1, e * 0.42), (e * 0.3, e * 0.25), (e * 0.5, e * 0.42)],
                 fill=(90, 40, 30))
    draw.rectangle((e * 0.25, e * 0.55, e * 0.33, e * 0.75), fill=(60, 40, 20))
    draw.text((e * 0.05, e * 0.05), "HELLO", fill=(0, 0, 0), font_size=max(1, e // 10))
    if transparent_corner:
        draw.rectangle((e * 0.5, e * 0.5, e, e), fill=(0, 0, 0, 0))
    return image


def to_png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def decode(png: bytes) -> Image.Image:
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        image.load()
        return image


def thumb(image: Image.Image) -> list[int]:
    grey = image.convert("RGBA").convert("RGB").convert("L")
    return list(grey.resize((32, 32), Image.Resampling.BOX).tobytes())


def correlation(a: list[int], b: list[int]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    var = sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b)
    return cov / math.sqrt(var) if var else 0.0


def likeness(variation: Image.Image, source: Image.Image) -> float:
    """Correlation with the source or its mirror: a mirrored composition still counts."""
    v = thumb(variation)
    return max(correlation(v, thumb(source)), correlation(v, thumb(ImageOps.mirror(source))))


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    diff = ImageChops.difference(a.convert("RGB"), b.convert("RGB"))
    return sum(ImageStat.Stat(diff).mean) / 3


def request(png: bytes, *, n: int, size: int, seed: int = 42) -> VariationRequest:
    source = SourceImage(png=png, width=0, height=0, pixels_sha256="p", upload_sha256="u")
    return VariationRequest(image=source, n=n, size=size, user=None, request_id="r", seed=seed)


@pytest.fixture
async def backend() -> AsyncIterator[ProceduralBackend]:
    b = ProceduralBackend("local", ProceduralOptions())
    await b.start()
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture(scope="module")
def scene_png() -> bytes:
    return to_png(scene())


# --------------------------------------------------------------------------- shape


@pytest.mark.parametrize("size", [256, 512, 1024])
async def test_exact_count_and_size(backend: ProceduralBackend, scene_png: bytes,
                                    size: int) -> None:
    for n in (1, 10):
        images = (await backend.generate(request(scene_png, n=n, size=size))).images
        assert len(images) == n
        for png in images:
            image = decode(png)
            assert image.size == (size, size)
            assert image.mode in ("RGB", "RGBA")


async def test_zero_images_is_an_empty_list(backend: ProceduralBackend,
                                            scene_png: bytes) -> None:
    assert (await backend.generate(request(scene_png, n=0, size=256))).images == []


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_bytes(scene_png: bytes) -> None:
    first = make_variations(scene_png, 4, 256, seed=7, strength=0.5)
    assert make_variations(scene_png, 4, 256, seed=7, strength=0.5) == first
    assert make_variations(scene_png, 4, 256, seed=8, strength=0.5) != first


def test_image_i_is_seeded_by_seed_plus_i(scene_png: bytes) -> None:
    """So a request for n=4 and one for n=2 share their first two images."""
    four = make_variations(scene_png, 4, 256, seed=100, strength=0.5)
    assert make_variations(scene_png, 2, 256, seed=100, strength=0.5) == four[:2]
    source = prepare_source(scene_png, 256)
    assert make_variation(source, 103, 0.5) == four[3]


async def test_backend_matches_the_pure_function(backend: ProceduralBackend,
                                                 scene_png: bytes) -> None:
    """Worker processes and chunking must not change a single byte."""
    images = (await backend.generate(request(scene_png, n=5, size=256, seed=9))).images
    assert images == make_variations(scene_png, 5, 256, seed=9, strength=0.5)


# --------------------------------------------------------------------------- content


@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0])
def test_variations_are_distinct(scene_png: bytes, strength: float) -> None:
    images = [decode(p) for p in make_variations(scene_png, 10, 256, 1, strength)]
    resized = scene().resize((256, 256), Image.Resampling.BICUBIC)
    for a, b in itertools.combinations(images, 2):
        assert mean_difference(a, b) > DISTINCT
    for image in images:
        assert mean_difference(image, resized) > DISTINCT


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_variations_are_recognisable(scene_png: bytes, strength: float) -> None:
    source = scene()
    for png in make_variations(scene_png, 10, 256, seed=3, strength=strength):
        assert likeness(decode(png), source) > LIKENESS


def test_likeness_measure_rejects_noise() -> None:
    """The check above means something: unrelated pixels score near zero."""
    rng = random.Random(5)
    noise = Image.frombytes("RGB", (256, 256), rng.randbytes(256 * 256 * 3))
    assert likeness(noise, scene()) < LIKENESS / 3
    assert likeness(scene().resize((256, 256)), scene()) > 0.99


def test_transparency_is_kept() -> None:
    source = scene(transparent_corner=True)
    for png in make_variations(to_png(source), 4, 256, seed=11, strength=0.5):
        image = decode(png)
        assert image.mode == "RGBA"
        alpha = image.getchannel("A").resize((8, 8), Image.Resampling.BOX)
        # The transparent quarter may move a little, not vanish or take over.
        transparent = sum(1 for a in alpha.tobytes() if a < 128)
        assert 8 <= transparent <= 24
        assert likeness(image, source.convert("RGB")) > LIKENESS


def test_opaque_input_gives_rgb_output(scene_png: bytes) -> None:
    assert decode(make_variations(scene_png, 1, 256, 0, 0.5)[0]).mode == "RGB"


def test_grey_input() -> None:
    source = scene().convert("L").convert("RGBA")
    images = [decode(p) for p in make_variations(to_png(source), 6, 256, 5, 0.5)]
    for image in images:
        assert likeness(image, source) > LIKENESS
    for a, b in itertools.combinations(images, 2):
        assert mean_difference(a, b) > DISTINCT


def test_one_pixel_input() -> None:
    tiny = to_png(Image.new("RGBA", (1, 1), (120, 80, 200, 255)))
    images = make_variations(tiny, 10, 256, seed=0, strength=0.5)
    assert len(set(images)) == 10
    assert all(decode(p).size == (256, 256) for p in images)


async def test_large_input(backend: ProceduralBackend) -> None:
    big = scene(2048)
    images = (await backend.generate(request(to_png(big), n=2, size=1024))).images
    assert [decode(p).size for p in images] == [(1024, 1024)] * 2
    assert likeness(decode(images[0]), big) > LIKENESS


def test_non_square_input_is_centre_cropped() -> None:
    wide = to_png(Image.new("RGBA", (300, 100), (10, 200, 30, 255)))
    assert decode(make_variations(wide, 1, 256, 0, 0.5)[0]).size == (256, 256)


# --------------------------------------------------------------------------- async and lifecycle


async def test_generate_does_not_block_the_event_loop(backend: ProceduralBackend) -> None:
    done = asyncio.Event()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    images = (await backend.generate(request(to_png(scene(1024)), n=4, size=1024))).images
    done.set()
    await task
    assert len(images) == 4
    assert ticks > 0


async def test_lifecycle(scene_png: bytes) -> None:
    backend = ProceduralBackend("local", ProceduralOptions(workers=1))
    with pytest.raises(BackendError) as not_started:
        await backend.generate(request(scene_png, n=1, size=256))
    assert not_started.value.status == 503
    assert not_started.value.retryable
    assert not (await backend.check()).ready

    await backend.start()
    await backend.start()  # idempotent
    state = await backend.check()
    assert state.ready and state.kind == "procedural" and state.name == "local"
    assert "not a neural model" in state.detail
    first = (await backend.generate(request(scene_png, n=2, size=256))).images

    await backend.close()
    await backend.close()  # idempotent
    assert not (await backend.check()).ready
    with pytest.raises(BackendError):
        await backend.generate(request(scene_png, n=1, size=256))

    await backend.start()  # a closed backend can be started again
    try:
        assert (await backend.generate(request(scene_png, n=2, size=256))).images == first
    finally:
        await backend.close()


async def test_thread_executor(scene_png: bytes) -> None:
    backend = ProceduralBackend("threads", ProceduralOptions(executor="thread", workers=2))
    await backend.start()
    try:
        images = (await backend.generate(request(scene_png, n=3, size=256, seed=4))).images
    finally:
        await backend.close()
    assert images == make_variations(scene_png, 3, 256, seed=4, strength=0.5)


async def test_a_crashed_worker_is_replaced(backend: ProceduralBackend,
                                            scene_png: bytes) -> None:
    executor = backend._executor
    assert executor is not None
    with pytest.raises(BrokenProcessPool):
        await asyncio.wrap_future(executor.submit(os._exit, 1))
    with pytest.raises(BackendError) as crashed:
        await backend.generate(request(scene_png, n=2, size=256))
    assert crashed.value.kind == "worker_crash" and crashed.value.retryable
    assert len((await backend.generate(request(scene_png, n=2, size=256))).images) == 2


async def test_undecodable_input_is_a_backend_error(backend: ProceduralBackend) -> None:
    with pytest.raises(BackendError) as failed:
        await backend.generate(request(b"not a png", n=1, size=256))
    assert failed.value.status == 500
    assert not failed.value.retryable


# --------------------------------------------------------------------------- options


def test_identity_names_version_and_strength() -> None:
    a = ProceduralBackend("a", ProceduralOptions(strength=0.5))
    b = ProceduralBackend("b", ProceduralOptions(strength=0.8, workers=1))
    assert a.identity == "procedural:v1:strength=0.5"
    assert b.identity == "procedural:v1:strength=0.8"


def test_registry_builds_it() -> None:
    created = create_backend("edge", "procedural", ProceduralOptions())
    assert isinstance(created, ProceduralBackend)
    assert created.workers == min(2, os.cpu_count() or 1)


@pytest.mark.parametrize(
    "kwargs",
    [{"strength": -0.1}, {"strength": 1.5}, {"workers": 0}, {"executor": "gpu"}],
)
def test_invalid_options(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ProceduralOptions(**kwargs)  # type: ignore[arg-type]


async def test_a_cancelled_request_stops_its_worker(scene_png: bytes,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 19 item 1: a dropped n=10 request used to keep its worker rendering all ten
    images. Now the image in progress is the last one made for it. (A thread executor,
    so the test can hold the first image and count the renders.)"""
    entered, release = threading.Event(), threading.Event()
    renders: list[int] = []
    original = recipe.make_variation

    def held_variation(source: Any, seed: int, strength: float) -> bytes:
        renders.append(seed)
        entered.set()
        release.wait(10)
        return original(source, seed, strength)

    monkeypatch.setattr(recipe, "make_variation", held_variation)
    backend = ProceduralBackend("threads", ProceduralOptions(executor="thread", workers=1))
    await backend.start()
    try:
        task = asyncio.create_task(backend.generate(request(scene_png, n=10, size=64)))
        await eventually(entered.is_set, "the first image rendering", 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        executor = backend._executor
        assert executor is not None
        # One worker: this runs once it is free, after whatever it still had to do.
        await asyncio.wrap_future(executor.submit(int))
        assert renders == [42]
        assert backend.images_in_progress() == 0
    finally:
        release.set()
        await backend.close()


async def test_a_cancelled_request_stops_its_worker_process(scene_png: bytes) -> None:
    backend = ProceduralBackend("procs", ProceduralOptions(workers=1))
    await backend.start()
    try:
        task = asyncio.create_task(backend.generate(request(scene_png, n=10, size=512)))
        await eventually(lambda: backend.images_rendered >= 1, "an image rendered", 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: backend.images_in_progress() == 0, "the worker idle", 30)
        assert backend.images_rendered <= 2  # the one done, and the one in progress
        # The worker serves the next request.
        assert len((await backend.generate(request(scene_png, n=2, size=64))).images) == 2
    finally:
        await backend.close()
