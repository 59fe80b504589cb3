"""The embedded, offline ``procedural`` backend.

This is a procedural image generator built on Pillow, **not a neural model**: it does
not understand the picture, it re-grades, re-frames, warps and re-textures it. Each
variation is a deterministic recipe drawn from ``random.Random(seed + i)``:

* composition: an optional mirror, a re-crop with a small rotation and a smooth mesh
  warp, all folded into one ``Image.transform(MESH)`` so pixels are resampled once;
* colour: a luminance-preserving hue rotation, saturation and white balance as one
  colour matrix, then per-channel curves (split toning, contrast, optional posterize)
  as one lookup table, and an optional tinted vignette;
* texture: at most one painterly filter (oil, watercolour, glow, poster, canvas
  relief, crisp), run at a reduced resolution where it is costly, then film grain.

Keeping luminance and layout roughly in place is what keeps the result recognisable;
the seeded grain makes sure no two variations share their pixels even when the source
is flat. The same source, size, seed and strength always give identical PNG bytes.

The work runs in a process pool by default. Many of Pillow's filters and transforms
hold the GIL: a thread pool was as fast for one request on an idle box, but with four
concurrent n=10 requests at 1024 px it took 5.7 s against 3.1 s for processes, and
stalled the event loop for up to 21 ms against 9 ms (``tests/perf/bench_procedural.py``
measures the single-request case). The price is shipping the source PNG to a worker
once per chunk and the PNG results back, a few ms per MB.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import io
import math
import os
import random
import signal
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from typing import ClassVar, Literal

from PIL import Image, ImageChops, ImageFilter, ImageOps

from gateway.backends.base import (
    DEFAULT_TIMEOUTS,
    BackendError,
    BackendOptions,
    BackendState,
    Timeouts,
)
from gateway.generation import Generation, VariationRequest

# Bump when a change to the recipe would change the images for the same seed: it is part
# of ``identity`` and so of the cache key.
ALGORITHM_VERSION = 1
# zlib level 1 with the run-length strategy: at 1024 px it encodes several times faster
# than Pillow's default (level 6) and, measured on photo-like and flat inputs, was both
# the fastest and the smallest of levels 0-2 x strategies.
PNG_COMPRESS_LEVEL = 1
PNG_COMPRESS_TYPE = zlib.Z_RLE
# Rec. 709 luma weights, as in the SVG/CSS hue-rotate and saturate colour matrices.
_LUMA = (0.2126, 0.7152, 0.0722)
_TEXTURES: tuple[str, ...] = ("oil", "watercolour", "glow", "poster", "canvas", "crisp")

Matrix3 = tuple[tuple[float, float, float], ...]


@dataclass(frozen=True)
class ProceduralOptions(BackendOptions):
    """Options of a ``kind: procedural`` backend.

    ``strength`` (0..1) is how far variations stray from the source: rotation, warp,
    hue range and the odds of a painterly filter all scale with it. ``workers`` is the
    executor size (default ``min(2, cpu count)``); ``executor`` picks processes (the
    default, see the module docstring) or threads (where extra processes are unwanted).
    """

    strength: float = 0.5
    workers: int | None = None
    executor: Literal["process", "thread"] = "process"

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be between 0 and 1, got {self.strength}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.executor not in ("process", "thread"):
            raise ValueError(f"executor must be 'process' or 'thread', got {self.executor!r}")


# --------------------------------------------------------------------------- pure part


@dataclass(frozen=True)
class PreparedSource:
    """The source decoded once per request and scaled to the output size.

    ``image`` is RGB when the source is fully opaque (cheaper filters, smaller PNGs)
    and RGBA otherwise, so transparency survives into the variations.
    """

    image: Image.Image
    size: int

    @property
    def has_alpha(self) -> bool:
        return self.image.mode == "RGBA"


def prepare_source(png: bytes, size: int) -> PreparedSource:
    """Decode ``png`` and scale it to ``size`` squared (centre-cropped if not square)."""
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    with Image.open(io.BytesIO(png)) as opened:
        image = opened.convert("RGBA")
    # Dropping an all-opaque alpha before resizing makes the resize ~30% cheaper.
    if image.getchannel("A").getextrema() == (255, 255):
        image = image.convert("RGB")
    if image.width != image.height:
        image = ImageOps.fit(image, (min(image.size),) * 2, Image.Resampling.BICUBIC)
    if image.size != (size, size):
        # Bicubic (antialiased when shrinking) is ~30% cheaper than Lanczos at 2048->1024
        # and the variations resample again anyway; the gap lets Pillow box-reduce first.
        image = image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0)
    return PreparedSource(image=image, size=size)


def make_variation(source: PreparedSource, seed: int, strength: float) -> bytes:
    """One variation of ``source`` as PNG bytes; a pure function of its arguments."""
    rng = random.Random(seed)
    size = source.size
    moved = _recompose(source.image, rng, strength)
    alpha = moved.getchannel("A") if source.has_alpha else None
    rgb = moved.convert("RGB") if source.has_alpha else moved

    texture, posterize_bits = _pick_texture(rng, strength)
    rgb = _apply_texture(rgb, texture, rng)
    rgb = rgb.convert("RGB", _colour_matrix(rng, strength))
    rgb = rgb.point(_curves(rng, strength, posterize_bits))
    if rng.random() < 0.3 + 0.4 * strength:
        rgb = ImageChops.multiply(rgb, _vignette(rng, strength, size))
    rgb = _grain(rgb, rng, strength)

    if alpha is not None:
        rgb.putalpha(alpha)
    out = io.BytesIO()
    rgb.save(out, "PNG", compress_level=PNG_COMPRESS_LEVEL,
             compress_type=PNG_COMPRESS_TYPE)
    return out.getvalue()


def render_seeds(png: bytes, size: int, seeds: Sequence[int], strength: float) -> list[bytes]:
    """Variations of ``png`` for each of ``seeds``, decoding the source only once.

    This is the unit of work an executor runs: taking the PNG rather than a decoded
    image keeps what crosses a process boundary small.
    """
    source = prepare_source(png, size)
    return [make_variation(source, seed, strength) for seed in seeds]


# The last sources a worker decoded: the images of one request arrive as one task each
# (so a cancelled request stops after the image in progress), and decoding the upload
# again for each would add ~15% at 1024 px.
_prepared_source = functools.lru_cache(maxsize=2)(prepare_source)


def render_seed(png: bytes, size: int, seed: int, strength: float) -> bytes:
    """One variation of ``png``: the unit of work an executor runs per image."""
    return make_variation(_prepared_source(png, size), seed, strength)


def make_variations(png: bytes, n: int, size: int, seed: int, strength: float) -> list[bytes]:
    """``n`` variations of ``png`` at ``size`` squared, image ``i`` seeded by ``seed + i``."""
    return render_seeds(png, size, [seed + i for i in range(n)], strength)


def _recompose(image: Image.Image, rng: random.Random, strength: float) -> Image.Image:
    """Mirror, re-crop, rotate and warp in a single mesh transform (one resampling)."""
    size = image.width
    mirror = rng.random() < 0.25 + 0.25 * strength
    angle = math.radians(rng.uniform(-1.0, 1.0) * (1.0 + 11.0 * strength))
    warp = size * rng.uniform(0.3, 1.0) * (0.004 + 0.022 * strength)
    cos, sin = math.cos(angle), math.sin(angle)
    # The largest crop whose rotated square, plus the warp margin, stays inside the image.
    fit = (size - 2.0 * warp) / (size * (abs(cos) + abs(sin)))
    crop = min(fit, 1.0 - rng.uniform(0.02, 0.04 + 0.22 * strength))
    half_extent = crop * size * (abs(cos) + abs(sin)) / 2.0 + warp
    slack = max(0.0, size / 2.0 - half_extent)
    cx = size / 2.0 + rng.uniform(-slack, slack)
    cy = size / 2.0 + rng.uniform(-slack, slack)

    # A smooth displacement field: two sinusoids per axis with random frequency/phase.
    waves = [
        (rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), rng.uniform(0.0, math.tau))
        for _ in range(4)
    ]

    def source_point(u: float, v: float) -> tuple[float, float]:
        """Where output point (u, v), both in 0..1, samples the source."""
        if mirror:
            u = 1.0 - u
        du, dv = (u - 0.5) * crop * size, (v - 0.5) * crop * size
        x = cx + cos * du - sin * dv
        y = cy + sin * du + cos * dv
        (fx1, fy1, p1), (fx2, fy2, p2), (fx3, fy3, p3), (fx4, fy4, p4) = waves
        x += warp * 0.5 * (math.sin(math.tau * (fx1 * u + fy1 * v) + p1)
                           + math.sin(math.tau * (fx2 * u - fy2 * v) + p2))
        y += warp * 0.5 * (math.sin(math.tau * (fx3 * u + fy3 * v) + p3)
                           + math.sin(math.tau * (fx4 * u - fy4 * v) + p4))
        return min(max(x, 0.0), float(size)), min(max(y, 0.0), float(size))

    cells = 8 if size >= 64 else 1
    edges = [round(i * size / cells) for i in range(cells + 1)]
    grid = [[source_point(i / cells, j / cells) for i in range(cells + 1)]
            for j in range(cells + 1)]
    mesh = []
    for j in range(cells):
        for i in range(cells):
            box = (edges[i], edges[j], edges[i + 1], edges[j + 1])
            # QUAD order: upper left, lower left, lower right, upper right.
            quad = (*grid[j][i], *grid[j + 1][i], *grid[j + 1][i + 1], *grid[j][i + 1])
            mesh.append((box, quad))
    return image.transform((size, size), Image.Transform.MESH, mesh, Image.Resampling.BILINEAR)


def _pick_texture(rng: random.Random, strength: float) -> tuple[str | None, int | None]:
    """At most one painterly filter; the odds of one grow with ``strength``."""
    texture = rng.choice(_TEXTURES) if rng.random() < 0.35 + 0.6 * strength else None
    bits = rng.choice((3, 4, 4, 5)) if texture == "poster" else None
    return texture, bits


def _scaled(image: Image.Image, factor: int, work: Callable[[Image.Image], Image.Image]
            ) -> Image.Image:
    """Run a costly filter at 1/``factor`` resolution and scale the result back up."""
    small_edge = max(16, image.width // factor)
    if small_edge >= image.width:
        return work(image)
    small = image.resize((small_edge, small_edge), Image.Resampling.BILINEAR,
                         reducing_gap=2.0)
    return work(small).resize(image.size, Image.Resampling.BICUBIC)


def _apply_texture(rgb: Image.Image, texture: str | None, rng: random.Random) -> Image.Image:
    if texture == "oil":
        # ModeFilter costs ~0.7 s at 1024 px; at 1/4 scale it is ~40 ms and reads as
        # broad brush dabs. Blending back some of the sharp image keeps the edges.
        paint = _scaled(rgb, 4, lambda im: im.filter(ImageFilter.ModeFilter(3)))
        return Image.blend(rgb, paint, rng.uniform(0.45, 0.7))
    if texture == "watercolour":
        # MedianFilter(5) costs ~180 ms at 512 px; at 1/4 scale it is ~45 ms at 1024.
        wash = _scaled(rgb, 4, lambda im: im.filter(ImageFilter.MedianFilter(5)))
        wash = Image.blend(rgb, wash, rng.uniform(0.5, 0.8))
        return wash.filter(ImageFilter.SMOOTH)
    if texture == "glow":
        blurred = _scaled(rgb, 4, lambda im: im.filter(ImageFilter.GaussianBlur(2)))
        return Image.blend(rgb, ImageChops.screen(rgb, blurred), rng.uniform(0.3, 0.6))
    if texture == "poster":
        return rgb.filter(ImageFilter.EDGE_ENHANCE)
    if texture == "canvas":
        relief = _scaled(rgb.convert("L"), 2, lambda im: im.filter(ImageFilter.EMBOSS))
        relief = relief.point(_soften_lut(rng.uniform(0.3, 0.6))).convert("RGB")
        return ImageChops.overlay(rgb, relief)
    if texture == "crisp":
        return rgb.filter(ImageFilter.EDGE_ENHANCE_MORE if rng.random() < 0.5
                          else ImageFilter.DETAIL)
    return rgb


def _soften_lut(amount: float) -> list[int]:
    """Pull values towards mid-grey (128 is neutral for overlay blending)."""
    return [round(128 + (v - 128) * amount) for v in range(256)]


def _matmul(a: Matrix3, b: Matrix3) -> Matrix3:
    def cell(r: int, c: int) -> float:
        return sum((a[r][k] * b[k][c] for k in range(3)), 0.0)
    return tuple((cell(r, 0), cell(r, 1), cell(r, 2)) for r in range(3))


def _colour_matrix(rng: random.Random, strength: float) -> tuple[float, ...]:
    """Hue rotation, saturation and white balance as one ``convert`` matrix.

    Both the hue rotation and the saturation matrices keep luma unchanged, so light
    and dark regions stay where they were: the palette moves, the picture does not.
    """
    lr, lg, lb = _LUMA
    theta = rng.uniform(-1.0, 1.0) * math.pi * (0.08 + 0.7 * strength)
    c, s = math.cos(theta), math.sin(theta)
    hue: Matrix3 = (
        (lr + c * (1 - lr) - s * lr, lg - c * lg - s * lg, lb - c * lb + s * (1 - lb)),
        (lr - c * lr + s * 0.143, lg + c * (1 - lg) + s * 0.140, lb - c * lb - s * 0.283),
        (lr - c * lr - s * (1 - lr), lg - c * lg + s * lg, lb + c * (1 - lb) + s * lb),
    )
    k = 1.0 + rng.uniform(-0.6, 0.6) * strength + rng.uniform(-0.05, 0.1)
    sat: Matrix3 = (
        (lr + (1 - lr) * k, lg - lg * k, lb - lb * k),
        (lr - lr * k, lg + (1 - lg) * k, lb - lb * k),
        (lr - lr * k, lg - lg * k, lb + (1 - lb) * k),
    )
    warmth = rng.uniform(-1.0, 1.0) * (0.02 + 0.12 * strength)
    gains = (1.0 + warmth, 1.0, 1.0 - warmth)
    m = _matmul(sat, hue)
    return tuple(
        value
        for row, gain in zip(m, gains, strict=True)
        for value in (row[0] * gain, row[1] * gain, row[2] * gain, 0.0)
    )


def _curves(rng: random.Random, strength: float, posterize_bits: int | None) -> list[int]:
    """Per-channel tone curves (split toning, contrast, lift) as one 768-entry LUT."""
    contrast = rng.uniform(-0.25, 0.6) * (0.3 + strength)
    lift = rng.uniform(-0.04, 0.06) * (0.3 + strength)
    lut: list[int] = []
    for _ in range(3):
        gamma = math.exp(rng.uniform(-1.0, 1.0) * (0.04 + 0.2 * strength))
        for v in range(256):
            x = (v / 255.0) ** gamma
            # Blend towards a smoothstep S-curve (contrast > 0) or away from it (< 0).
            x += contrast * (x * x * (3.0 - 2.0 * x) - x)
            x = lift + x * (1.0 - lift)
            if posterize_bits is not None:
                levels = (1 << posterize_bits) - 1
                x = round(x * levels) / levels
            lut.append(min(255, max(0, round(x * 255.0))))
    return lut


def _vignette(rng: random.Random, strength: float, size: int) -> Image.Image:
    """A multiply layer, white in the centre, darker and slightly tinted at the corners."""
    amount = rng.uniform(0.15, 0.25 + 0.3 * strength)
    tint = [rng.uniform(0.8, 1.2) for _ in range(3)]
    radial = Image.radial_gradient("L")  # 0 at the centre, 255 at the corners
    bands = [
        radial.point([round(255 * (1.0 - min(1.0, amount * t) * (v / 255.0) ** 2))
                      for v in range(256)])
        for t in tint
    ]
    return Image.merge("RGB", bands).resize((size, size), Image.Resampling.BILINEAR)


def _grain(rgb: Image.Image, rng: random.Random, strength: float) -> Image.Image:
    """Monochrome film grain from the seeded RNG (never Pillow's unseeded noise)."""
    size = rgb.width
    edge = max(1, size // 2)
    amplitude = 2.0 + rng.uniform(0.0, 10.0) * strength
    lut = [round(128 + (v - 127.5) / 127.5 * amplitude) for v in range(256)]
    noise = Image.frombytes("L", (edge, edge), rng.randbytes(edge * edge)).point(lut)
    if edge != size:
        noise = noise.resize((size, size), Image.Resampling.BILINEAR)
    return ImageChops.add(rgb, Image.merge("RGB", (noise, noise, noise)), 1.0, -128)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _watch_parent(parent_pid: int, interval: float = 1.0) -> None:
    """Where there is no parent-death signal: exit once the gateway is gone."""
    while os.getppid() == parent_pid:
        time.sleep(interval)
    os._exit(0)


def _worker_init(parent_pid: int) -> None:
    """Runs first in every worker: its life ends with the gateway's.

    A kill -9 of the gateway, or a SIGTERM during start-up before its handlers were in
    place, used to leave the workers (and, through them, multiprocessing's resource
    tracker) running for good: they wait on a queue whose write end they hold
    themselves. On Linux the kernel sends SIGTERM when the parent dies (prctl
    ``PR_SET_PDEATHSIG``; workers are spawned from the event loop's thread, which lives
    as long as the process); elsewhere a thread watches the parent. Ctrl-C reaches the
    whole process group: workers ignore SIGINT and let the gateway shut them down, so
    no worker prints a KeyboardInterrupt traceback.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    armed = False
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
    if os.getppid() != parent_pid:  # the gateway died before the signal was armed
        os._exit(0)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True,
                         name="parent-watch").start()


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while workers are spawned (main thread only; elsewhere a no-op).

    A spawned process inherits an *ignored* SIGINT through exec, and Python then keeps
    it ignored: a Ctrl-C in the terminal, which reaches the whole process group, cannot
    interrupt a worker still importing, before ``_worker_init`` runs. The gateway's own
    handler is back as soon as the workers are spawned.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _warm_up() -> int:
    """Runs once per worker at start so the first request does not pay for imports."""
    return os.getpid()


# --------------------------------------------------------------------------- backend


class ProceduralBackend:
    """In-process Pillow generator: the default backend, for demos and load tests."""

    kind: ClassVar[str] = "procedural"
    options_class: ClassVar[type[BackendOptions]] = ProceduralOptions

    def __init__(self, name: str, options: ProceduralOptions,
                 timeouts: Timeouts = DEFAULT_TIMEOUTS) -> None:
        # ``timeouts`` bound network exchanges; nothing here waits on one (the router's
        # deadline still bounds each call).
        self.name = name
        self.options = options
        self.workers = options.workers or min(2, os.cpu_count() or 1)
        self._executor: Executor | None = None
        # Images handed to the executor and not finished yet, and images rendered: a
        # request that is cancelled stops submitting, and the image in progress is the
        # last its worker makes. Updated from executor threads, hence the lock.
        self._counts_lock = threading.Lock()
        self._submitted = 0
        self._finished = 0
        self._rendered = 0

    @property
    def identity(self) -> str:
        # Workers and executor kind do not change the pixels, so they are not part of it.
        return f"procedural:v{ALGORITHM_VERSION}:strength={self.options.strength:g}"

    def _new_executor(self) -> Executor:
        if self.options.executor == "thread":
            return ThreadPoolExecutor(self.workers, thread_name_prefix=f"procedural-{self.name}")
        # "spawn": forking an asyncio process that already runs threads can deadlock.
        return ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"),
                                   initializer=_worker_init, initargs=(os.getpid(),))

    async def start(self) -> None:
        """Create the executor and start its workers; calling it again is a no-op."""
        if self._executor is not None:
            return
        executor = self._executor = self._new_executor()
        loop = asyncio.get_running_loop()
        with _sigint_ignored():  # submitting spawns the workers, one per call
            warm_ups = [loop.run_in_executor(executor, _warm_up) for _ in range(self.workers)]
        try:
            await asyncio.gather(*warm_ups)
        except BaseException:
            # Leave no half-started pool behind, so a later start() can try again.
            if self._executor is executor:
                self._executor = None
            executor.shutdown(wait=False, cancel_futures=True)
            raise

    async def close(self) -> None:
        """Shut the executor down; ``start`` may be called again afterwards."""
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: executor.shutdown(wait=True, cancel_futures=True)
            )

    async def check(self) -> BackendState:
        started = self._executor is not None
        return BackendState(
            name=self.name,
            kind=self.kind,
            ready=started,
            detail="procedural generator (Pillow), not a neural model"
            if started else "not started",
            extra={
                "strength": self.options.strength,
                "executor": self.options.executor,
                "workers": self.workers,
                "images_in_progress": self.images_in_progress(),
            },
        )

    def images_in_progress(self) -> int:
        """Images submitted to the workers and not finished (queued or rendering)."""
        with self._counts_lock:
            return self._submitted - self._finished

    @property
    def images_rendered(self) -> int:
        """Images the workers have finished since start, for requests that left too."""
        with self._counts_lock:
            return self._rendered

    def _image_done(self, future: Future[bytes]) -> None:
        with self._counts_lock:
            self._finished += 1
            if not future.cancelled() and future.exception() is None:
                self._rendered += 1

    async def _render(self, executor: Executor, request: VariationRequest, seed: int
                      ) -> bytes:
        """One image on a worker. Cancelled while queued, it never runs; cancelled while
        it renders, the worker finishes it (a process cannot be interrupted safely) and
        the caller submits no more."""
        with self._counts_lock:
            self._submitted += 1
        try:
            future = executor.submit(render_seed, request.image.png, request.size, seed,
                                     self.options.strength)
        except BaseException as exc:
            with self._counts_lock:
                self._finished += 1
            if isinstance(exc, RuntimeError) and not isinstance(exc, BrokenProcessPool):
                # shut down by close() between two images
                raise BackendError(503, f"backend {self.name!r} was closed", kind="closed",
                                   retryable=True, trips_breaker=False) from None
            raise
        future.add_done_callback(self._image_done)
        return await asyncio.wrap_future(future)

    async def generate(self, request: VariationRequest) -> Generation:
        """Render the ``n`` images on the workers, one task per image and at most one
        image per worker at a time, so a request whose client leaves (cancelled) stops
        its workers after the images in progress instead of rendering all ``n``."""
        executor = self._executor
        if executor is None:
            raise BackendError(503, f"backend {self.name!r} is not started",
                               kind="not_started", retryable=True, trips_breaker=False)
        if request.n <= 0:
            return Generation([])
        images: list[bytes] = [b""] * request.n
        lanes = min(self.workers, request.n)

        async def lane(first: int) -> None:
            for i in range(first, request.n, lanes):
                images[i] = await self._render(executor, request, request.seed + i)

        tasks = [asyncio.ensure_future(lane(k)) for k in range(lanes)]
        try:
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._executor is executor or (task is not None and task.cancelling()):
                raise  # our caller was cancelled: let it propagate
            # close() cancelled the queued chunks: a failure of this backend, not the caller's.
            raise BackendError(503, f"backend {self.name!r} was closed", kind="closed",
                               retryable=True, trips_breaker=False) from None
        except BrokenProcessPool as exc:
            # A worker died (e.g. killed for memory): replace the pool for later requests.
            if self._executor is executor:
                self._executor = self._new_executor()
                executor.shutdown(wait=False, cancel_futures=True)
            raise BackendError(503, "procedural worker crashed", kind="worker_crash",
                               retryable=True, trips_breaker=False) from exc
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise BackendError(500, f"procedural generator failed: {exc}", kind="error",
                               retryable=False, trips_breaker=False) from exc
        finally:  # one lane failed (or we were cancelled): the others submit no more
            for pending in tasks:
                pending.cancel()
        return Generation(images)
