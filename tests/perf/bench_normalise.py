"""Pictures and references for normalising upstream answers (``to_png``).

gpt-image answers 1024 px images (backends.md, "gpt-image through /v1/images/edits");
the gateway fits them to the requested size and stores PNG. Shared by the bench
(``bench_peer.py``: its fake's answer, CPU ms per image before and after) and the
quality test (``tests/backends/test_normalise.py``: the Lanczos reference).
"""

from __future__ import annotations

import io
import statistics
import time
from typing import Any

from PIL import Image, ImageChops, ImageFilter


def photo(edge: int = 1024, noise: float = 2.0, seed: int = 0, blur: float = 2.0
          ) -> Image.Image:
    """A photo-like RGB picture: smooth gradients, sharp fractal edges and sensor-like
    noise. With ``noise=2`` a 1024 px PNG of it is ~1.4 MB, like gpt-image's PNG
    answers for real pictures (backends.md: "typically 1.5-3 MB")."""
    lin = Image.linear_gradient("L").resize((edge, edge))
    rad = Image.radial_gradient("L").resize((edge, edge))
    shift = 0.05 * seed
    frac = Image.effect_mandelbrot((edge, edge), (-1.05, -0.3 + shift, -0.45, 0.3 + shift), 120)
    if blur:
        frac = frac.filter(ImageFilter.GaussianBlur(blur))
    pairs = ((lin, frac), (rad, frac.rotate(90)),
             (frac.transpose(Image.Transpose.FLIP_LEFT_RIGHT), lin.rotate(90)))
    channels = []
    for a, b in pairs:
        # effect_noise is centred on 128: add it with offset -128.
        channels.append(ImageChops.add(ImageChops.blend(a, b, 0.5),
                                       Image.effect_noise((edge, edge), noise), 1.0, -128))
    return Image.merge("RGB", channels)


def encode(img: Image.Image, fmt: str, quality: int = 100) -> bytes:
    """``img`` as gpt-image would send it for ``output_format=fmt`` (``quality``: its
    ``output_compression``, 100 by default)."""
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG")
    elif fmt == "jpeg":
        img.save(buf, "JPEG", quality=quality)
    else:
        img.save(buf, "WEBP", quality=quality)
    return buf.getvalue()


def cpu_ms(fn: Any, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.thread_time()
        fn()
        times.append((time.thread_time() - t) * 1000)
    return statistics.median(times)


def lanczos_reference(data: bytes, size: int) -> Image.Image:
    """What ``to_png`` did before draft decoding and the reduce step: a full decode and
    ``ImageOps.fit`` with Lanczos (the quality test's reference)."""
    from PIL import ImageOps

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        mode = "RGBA" if "A" in img.getbands() else "RGB"
        out = img.convert(mode)
    if out.size != (size, size):
        out = ImageOps.fit(out, (size, size), Image.Resampling.LANCZOS)
    return out


def previous_to_png(data: bytes, size: int) -> bytes:
    """The ``to_png`` of commit 823bbe6 (for the before/after rows): full decode,
    Lanczos fit, Pillow's PNG encoder at ``compress_level=1``."""
    from gateway import png

    plain = png.plain_png_of_size(data, size)
    if plain is not None:
        return plain
    buf = io.BytesIO()
    lanczos_reference(data, size).save(buf, "PNG", compress_level=1)
    return buf.getvalue()
