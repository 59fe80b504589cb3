"""``variations-gateway vary``: a small client for a gateway, handy without GIMP."""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sys
import time

import aiohttp


def _progress(text: str) -> None:
    sys.stderr.write(f"\r\033[K{text}" if sys.stderr.isatty() else f"{text}\n")
    sys.stderr.flush()


def _error_sentence(status: int, body: object) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        code = f" [{err.get('code')}]" if err.get("code") else ""
        return f"HTTP {status}{code}: {err.get('message')}"
    return f"HTTP {status}: unexpected response from the gateway"


async def _vary(args: argparse.Namespace) -> int:
    url = (args.url or os.environ.get("VARIATIONS_GATEWAY_URL") or "http://127.0.0.1:8080")
    url = url.rstrip("/")
    if not url.endswith("/v1"):
        url += "/v1"
    token = args.token or os.environ.get("VARIATIONS_GATEWAY_TOKEN") or ""
    data = args.image.read_bytes()
    form = aiohttp.FormData()
    form.add_field("image", data, filename=args.image.name, content_type="image/png")
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
        path = args.output / f"{stem}-variation-{i}.png"
        path.write_bytes(base64.b64decode(item["b64_json"]))
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


__all__ = ["vary"]
