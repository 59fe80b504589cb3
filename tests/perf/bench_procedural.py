"""Wall time of the ``procedural`` backend per request, through its async API.

The source is a 2048 px RGBA image with photo-like detail and fine noise, the worst case
for both the downscale and PNG encoding. ``run()`` returns one row per (size, n) with
the median and max wall time and the worst event-loop stall seen meanwhile (a 5 ms
ticker's lateness). Run this file directly for a table; ``--executor thread`` compares
against a thread pool.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import statistics
import time

from PIL import Image, ImageChops, ImageFilter

from gateway.backends.procedural import ProceduralBackend, ProceduralOptions
from gateway.generation import SourceImage, VariationRequest

SIZES = (256, 512, 1024)
COUNTS = (1, 10)


def source_png(edge: int = 2048) -> bytes:
    """A detailed, noisy, partly transparent square PNG (photo-like, hard to compress)."""
    fractal = Image.effect_mandelbrot((edge, edge), (-2.0, -1.5, 1.0, 1.5), 100)
    fractal = fractal.filter(ImageFilter.GaussianBlur(1))
    rgb = Image.merge("RGB", (fractal, fractal.rotate(90),
                              fractal.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    grain = Image.frombytes("L", (edge, edge), random.Random(1).randbytes(edge * edge))
    grain = grain.point([128 + (v - 128) // 10 for v in range(256)]).convert("RGB")
    image = ImageChops.add(rgb, grain, 1.0, -128).convert("RGBA")
    image.putalpha(Image.radial_gradient("L").resize((edge, edge)).point(
        [255 if v < 200 else 0 for v in range(256)]))
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=1)
    return out.getvalue()


def _request(png: bytes, edge: int, n: int, size: int, seed: int) -> VariationRequest:
    source = SourceImage(png=png, width=edge, height=edge, pixels_sha256="bench",
                         upload_sha256="bench")
    return VariationRequest(image=source, n=n, size=size, user=None,
                            request_id=f"bench-{seed}", seed=seed)


async def _ticker(lags_ms: list[float], stop: asyncio.Event, period: float = 0.005) -> None:
    """Record how late each 5 ms tick fires: the event-loop stall ``generate`` causes."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        due = loop.time() + period
        await asyncio.sleep(period)
        lags_ms.append(max(0.0, loop.time() - due) * 1000.0)


async def _measure(options: ProceduralOptions, repeats: int) -> list[dict[str, object]]:
    edge = 2048
    png = source_png(edge)
    backend = ProceduralBackend("bench", options)
    await backend.start()
    rows: list[dict[str, object]] = []
    try:
        await backend.generate(_request(png, edge, 2, 256, 0))  # warm caches and imports
        for size in SIZES:
            for n in COUNTS:
                times_ms: list[float] = []
                lags_ms: list[float] = []
                stop = asyncio.Event()
                ticker = asyncio.create_task(_ticker(lags_ms, stop))
                for rep in range(repeats):
                    started = time.perf_counter()
                    images = (await backend.generate(_request(png, edge, n, size, rep))).images
                    times_ms.append((time.perf_counter() - started) * 1000.0)
                    assert len(images) == n
                stop.set()
                await ticker
                rows.append({
                    "size": size,
                    "n": n,
                    "executor": options.executor,
                    "workers": backend.workers,
                    "median_ms": round(statistics.median(times_ms), 1),
                    "max_ms": round(max(times_ms), 1),
                    "loop_lag_max_ms": round(max(lags_ms, default=0.0), 1),
                })
    finally:
        await backend.close()
    return rows


def run(repeats: int = 5, executor: str = "process") -> list[dict[str, object]]:
    """Median and max wall time (ms) of one ``generate`` call per size and n."""
    options = ProceduralOptions(executor="thread" if executor == "thread" else "process")
    return asyncio.run(_measure(options, repeats))


def _table(rows: list[dict[str, object]]) -> str:
    lines = [f"{'size':>5} {'n':>3} {'executor':>8} {'median_ms':>10} {'max_ms':>8}"
             f" {'loop_lag_ms':>11}"]
    lines += [
        f"{r['size']:>5} {r['n']:>3} {r['executor']:>8} {r['median_ms']:>10} {r['max_ms']:>8}"
        f" {r['loop_lag_max_ms']:>11}"
        for r in rows
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--executor", choices=("process", "thread"), default="process")
    args = parser.parse_args()
    print(_table(run(args.repeats, args.executor)))
