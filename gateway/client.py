"""``variations-gateway vary``: a small client for a gateway, handy without GIMP."""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

if TYPE_CHECKING:
    from PIL import Image

# What the gateway (as OpenAI) takes: a square PNG under 4 MB.
MAX_UPLOAD_BYTES = 4 * 1024 * 1024
SQUARE_MODES = ("crop", "pad")


def _progress(text: str) -> None:
    sys.stderr.write(f"\r\033[K{text}" if sys.stderr.isatty() else f"{text}\n")
    sys.stderr.flush()


def _error_sentence(status: int, body: object) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        code = f" [{err.get('code')}]" if err.get("code") else ""
        return f"HTTP {status}{code}: {err.get('message')}"
    return f"HTTP {status}: unexpected response from the gateway"


def prepare_image(data: bytes, square: str = "crop") -> tuple[bytes, str | None]:
    """``data`` as the square PNG the gateway takes, and what was done to it (None: sent
    as is).

    Any format Pillow reads is converted to PNG; a non-square image is centre-cropped
    (``crop``, as the GIMP plug-in does by default) or padded with transparency
    (``pad``, keeps everything); one still over 4 MB is scaled down to 1024 px.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as opened:
            fmt = opened.format
            image = ImageOps.exif_transpose(opened)
            image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not an image Pillow can read ({exc})") from None
    width, height = image.size
    if fmt == "PNG" and width == height and len(data) <= MAX_UPLOAD_BYTES:
        return data, None
    done = [] if fmt == "PNG" else [f"converted from {fmt} to PNG"]
    image = image.convert("RGBA")
    if width != height:
        edge = min(width, height) if square == "crop" else max(width, height)
        if square == "crop":
            image = ImageOps.fit(image, (edge, edge), Image.Resampling.BICUBIC)
        else:
            canvas = Image.new("RGBA", (edge, edge), (0, 0, 0, 0))
            canvas.paste(image, ((edge - width) // 2, (edge - height) // 2))
            image = canvas
        done.append(f"{'centre-cropped' if square == 'crop' else 'padded'} from "
                    f"{width}x{height} to {edge}x{edge}")
    out = _png(image)
    if len(out) > MAX_UPLOAD_BYTES:
        image = image.resize((1024, 1024), Image.Resampling.LANCZOS)
        out = _png(image)
        done.append("scaled to 1024x1024 to stay under 4 MB")
    return out, "; ".join(done)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _write_new(directory: Path, stem: str, data: bytes) -> Path:
    """Write ``data`` to the next free ``{stem}-variation-{k}.png``: numbering goes on
    after the highest one already there, and an existing file is never replaced (even
    by another ``vary`` running at the same time: ``x`` mode)."""
    pattern = re.compile(rf"{re.escape(stem)}-variation-(\d+)\.png")
    taken = [int(m.group(1)) for f in directory.iterdir() if (m := pattern.fullmatch(f.name))]
    k = max(taken, default=0) + 1
    while True:
        path = directory / f"{stem}-variation-{k}.png"
        try:
            with open(path, "xb") as out:
                out.write(data)
            return path
        except FileExistsError:
            k += 1


async def _vary(args: argparse.Namespace) -> int:
    url = (args.url or os.environ.get("VARIATIONS_GATEWAY_URL") or "http://127.0.0.1:8080")
    url = url.rstrip("/")
    if not url.endswith("/v1"):
        url += "/v1"
    token = args.token or os.environ.get("VARIATIONS_GATEWAY_TOKEN") or ""
    try:
        data, note = prepare_image(args.image.read_bytes(), getattr(args, "square", "crop"))
    except ValueError as exc:
        print(f"vary: {args.image}: {exc}", file=sys.stderr)
        return 2
    if note:
        _progress(f"{args.image.name}: {note}")
    form = aiohttp.FormData()
    form.add_field("image", data, filename=f"{args.image.stem}.png",
                   content_type="image/png")
    form.add_field("n", str(args.n))
    form.add_field("size", args.size)
    form.add_field("response_format", "b64_json")
    if args.user:
        form.add_field("user", args.user)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if args.fresh:
        headers["Cache-Control"] = "no-cache"
    started = time.monotonic()
    _progress(f"uploading {args.image.name} ({len(data) // 1024} KB) to {url} ...")
    timeout = aiohttp.ClientTimeout(total=600, connect=10)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, session.post(
                f"{url}/images/variations", data=form, headers=headers) as resp:
            _progress(f"waiting for {args.n} variation(s) at {args.size} ...")
            try:
                body = await resp.json(content_type=None)
            except ValueError:
                body = None
            cache = resp.headers.get("X-Cache", "-")
            if resp.status != 200:
                _progress("")
                print(f"vary: {_error_sentence(resp.status, body)}", file=sys.stderr)
                return 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        _progress("")
        print(f"vary: could not reach the gateway at {url}: {exc}", file=sys.stderr)
        return 1
    args.output.mkdir(parents=True, exist_ok=True)
    items = body["data"] if isinstance(body, dict) else []
    stem = args.image.stem
    for i, item in enumerate(items, 1):
        path = _write_new(args.output, stem, base64.b64decode(item["b64_json"]))
        _progress(f"writing {i}/{len(items)}: {path}")
    _progress(f"done: {len(items)} image(s) in {time.monotonic() - started:.1f} s "
              f"(cache: {cache})")
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    return 0


def vary(args: argparse.Namespace) -> int:
    if not args.image.is_file():
        print(f"vary: no such file: {args.image}", file=sys.stderr)
        return 2
    return asyncio.run(_vary(args))


__all__ = ["prepare_image", "vary"]
