"""The ``procedural`` backend's recipe: pure functions from a source PNG to variations.

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

Nothing here knows of executors or requests: the backend (``gateway.backends.procedural``)
runs :func:`render_seed` on its workers, and the tests and benchmarks call the rest.
"""

from __future__ import annotations

import functools
import io
import math
import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image, ImageChops, ImageFilter, ImageOps

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
        return float(sum(a[r][k] * b[k][c] for k in range(3)))

    return ((cell(0, 0), cell(0, 1), cell(0, 2)),
            (cell(1, 0), cell(1, 1), cell(1, 2)),
            (cell(2, 0), cell(2, 1), cell(2, 2)))


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
