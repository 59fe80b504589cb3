"""``make bench``: measured figures, each next to a baseline run in the same process.

Sections (each prints a Markdown table; all are written to ``tests/perf/REPORT.md`` with
the commit they were measured on):

- procedural backend wall time per size and n;
- gateway added latency on a miss: whole request minus the backend's own time, for a
  512x512 upload, against calling the backend function directly;
- cache hits (url and b64_json): latency and throughput of a real gateway process under
  wrk, against nginx serving the same response bytes as a static file;
- Redis-backed state next to SQLite (when ``tests/perf/bench_redis.py`` is present);
- load, memory and startup (``tests/perf/bench_load.py``): miss overhead against a fake
  upstream direct and behind nginx ``proxy_pass`` (chart: latency-vs-concurrency.png),
  peak RSS under 100 x 4 MB uploads, RSS growth 1k -> 20k requests, 600 held-open
  3.9 MB uploads from one member (peak RSS and RSS after), startup, idle RSS;
- gpt-image (``tests/perf/bench_peer.py``): CPU ms per normalised answer before and
  after, and the gateway next to LiteLLM's proxy against the same fake upstream;
- mixed traffic (``tests/perf/bench_mixed.py``): a team's requests (hits, misses,
  usage polls, refusals) per kind, and an A/B of each kept speed trick on it and on
  the gpt-image row.

The gateway and nginx are pinned to core 0, wrk to core 1, so client and server do not
fight for one core. Goals are printed beside the figures; nothing here asserts.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import io
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from support import free_port, multipart_body, stop_process, wait_http  # noqa: E402

from gateway import logs  # noqa: E402
from gateway.app import build_app  # noqa: E402
from gateway.config import build_config  # noqa: E402
from gateway.generation import VariationRequest  # noqa: E402
from gateway.keys import LIVE  # noqa: E402

REPORT = ROOT / "tests" / "perf" / "REPORT.md"
PIN_SERVER = ["taskset", "-c", "0"] if shutil.which("taskset") and os.cpu_count() != 1 else []
PIN_CLIENT = ["taskset", "-c", "1"] if PIN_SERVER else []


# Sent as the ``user`` field on every benchmark request, as the GIMP plug-in and SDK
# clients do: the abuse monitor then sees each one (it once slowed every later request).
END_USER = "artist-7"


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def verdict(value: float, goal: float, unit: str) -> str:
    """``met`` or by how much a below-``goal`` target was missed."""
    if value < goal:
        return "met"
    return f"missed by {value - goal:.2f} {unit}"


def table(title: str, rows: list[dict[str, Any]]) -> str:
    if not rows:
        return f"### {title}\n\n(no rows)\n"
    cols = list(rows[0])
    out = [f"### {title}", "", "| " + " | ".join(cols) + " |",
           "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(out) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def photo_png(edge: int) -> bytes:
    """A photo-like square PNG (what an artist's layer export looks like)."""
    base = Image.effect_mandelbrot((edge, edge), (-2.0, -1.5, 1.0, 1.5), 60)
    img = Image.merge("RGB", (base, base.rotate(90), base.transpose(
        Image.Transpose.FLIP_LEFT_RIGHT)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def raw_config(tmp: Path, **extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "auth": {"mode": "none"},
        "quota_defaults": {"images_per_day": None, "requests_per_minute": None,
                           "max_concurrent": None},
        "state": {"kind": "sqlite", "path": str(tmp / "state.sqlite3")},
        "cache": {"dir": str(tmp / "cache")},
        "images": {"dir": str(tmp / "images")},
        "audit": {"path": str(tmp / "audit.sqlite3")},
        "logging": {"level": "warning"},
        "backends": [{"name": "local", "kind": "procedural"}],
        "route": ["local"],
    }
    raw.update(extra)
    return raw


# ------------------------------------------------------------------ procedural


def bench_procedural() -> list[dict[str, Any]]:
    mod = importlib.import_module("bench_procedural")
    rows = mod.run()
    for r in rows:
        if r.get("size") == 1024 and r.get("n") == 10:
            r["goal"] = "< 2000 ms"
    return rows


# ------------------------------------------------------------------ overhead


async def _overhead(requests: int = 200) -> list[dict[str, Any]]:
    """Client-observed latency minus the backend's own time, per request."""
    # The server logs one JSON line per request, as in production (to a discarded stream).
    logs.configure("info", "json", stream=open(os.devnull, "w"))  # noqa: SIM115, ASYNC230
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        app = build_app(build_config(raw_config(tmp)))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        backend = app[LIVE].current.router.backends["local"]
        original = backend.generate
        backend_times: list[float] = []

        async def timed(request: VariationRequest) -> list[bytes]:
            t = time.perf_counter()
            try:
                return await original(request)
            finally:
                backend_times.append(time.perf_counter() - t)

        backend.generate = timed  # type: ignore[method-assign]
        upload = photo_png(512)
        # Distinct uploads (one pixel differs) so that cache-on requests are all misses.
        base = Image.open(io.BytesIO(upload)).convert("RGB")
        distinct = []
        per_row = requests + 10
        for i in range(3 * per_row + 100):  # a set per row; the last 100 warm up
            img = base.copy()
            img.putpixel((i % 512, i // 512), (i % 256, 7, 9))
            buf = io.BytesIO()
            img.save(buf, "PNG")
            distinct.append(buf.getvalue())
        rows = []
        try:
            async with aiohttp.ClientSession() as http:
                # Warm-up: the first ~100 misses of a fresh gateway pay one-off costs
                # (new cache directories, executor threads, SQLite pages); whichever row
                # ran first measured ~3 ms more. Distinct images, not reused below.
                for i in range(100):
                    form = aiohttp.FormData()
                    form.add_field("image", distinct[-1 - i], filename="w.png",
                                   content_type="image/png")
                    form.add_field("size", "256x256")
                    async with http.post(f"http://127.0.0.1:{port}/v1/images/variations",
                                         data=form) as r:
                        await r.read()
                for row, (mode, size) in enumerate((
                        ("cache miss, new image", "256x256"),
                        ("cache miss, new image", "512x512"),
                        ("Cache-Control: no-store", "512x512"))):
                    overheads, directs = [], []
                    for i in range(requests + 10):
                        form = aiohttp.FormData()
                        body = upload if "no-store" in mode else distinct[row * per_row + i]
                        form.add_field("image", body, filename="a.png",
                                       content_type="image/png")
                        form.add_field("size", size)
                        form.add_field("response_format", "b64_json")
                        backend_times.clear()
                        headers = {"Cache-Control": "no-store"} if "no-store" in mode else {}
                        t = time.perf_counter()
                        async with http.post(f"http://127.0.0.1:{port}/v1/images/variations",
                                             data=form, headers=headers) as r:
                            await r.read()
                            assert r.status == 200, r.status
                        total = time.perf_counter() - t
                        if i >= 10:  # warm-up
                            overheads.append((total - sum(backend_times)) * 1000)
                            directs.append(sum(backend_times) * 1000)
                    # The backend called directly, same process, same input.
                    direct = []
                    for i in range(50):
                        t = time.perf_counter()
                        await original(_direct_request(upload, int(size.split("x")[0]), i))
                        direct.append((time.perf_counter() - t) * 1000)
                    rows.append({
                        "request": mode,
                        "upload": f"512x512 PNG, {len(upload) // 1024} KB", "size": size,
                        "n": 1, "backend direct p50 ms": statistics.median(direct),
                        "backend in gateway p50 ms": statistics.median(directs),
                        "added p50 ms": pct(overheads, 50), "added p99 ms": pct(overheads, 99),
                        "goal added p50 < 3 ms": verdict(pct(overheads, 50), 3.0, "ms"),
                        "why": "" if pct(overheads, 50) < 3 or "no-store" in mode else (
                            "a new image is decoded and its pixels hashed for the cache key "
                            "(~2.9 ms for 512 px), and its results are written to the cache; "
                            "no-store (the same path without the cache) is the row below"),
                    })
        finally:
            await runner.cleanup()
    return rows


def _direct_request(upload: bytes, size: int, seed: int) -> VariationRequest:
    from gateway.generation import SourceImage

    source = SourceImage(upload, 512, 512, "bench", "bench")
    return VariationRequest(source, 1, size, None, f"direct-{seed}", seed)


# ------------------------------------------------------------------ wrk and nginx


WRK_LUA = """
local f = io.open(os.getenv("BENCH_BODY"), "rb")
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. os.getenv("BENCH_BOUNDARY")
local token = os.getenv("BENCH_TOKEN")
if token and token ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. token
end
local cache_control = os.getenv("BENCH_CACHE_CONTROL")
if cache_control and cache_control ~= "" then
  wrk.headers["Cache-Control"] = cache_control
end
"""


# The GIMP plug-in's boundary shape (vg_multipart.build_multipart); the SDK's httpx and curl
# also send 32-40 characters. Longer boundaries are found faster: a 13-character one made
# every request's scan of the upload cost 13 us instead of 6.
BOUNDARY = "----generate-variations-0123456789abcdef0123456789abcdef"


def wrk(url: str, connections: int, seconds: int, lua: Path | None = None,
        env: dict[str, str] | None = None) -> dict[str, float]:
    cmd = [*PIN_CLIENT, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
           "--timeout", "10s"]
    if lua:
        cmd += ["-s", str(lua)]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})}).stdout
    def latency(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50": latency("50"), "p99": latency("99"),
            "non2xx": float(errors.group(1)) if errors else 0.0}


def serve_forever(handler: Any, port: int) -> None:
    """Run a low-level aiohttp ``handler`` on loopback ``port`` until killed (the fake
    upstreams' process bodies)."""
    from aiohttp import web

    async def serve() -> None:
        runner = web.ServerRunner(web.Server(handler), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    asyncio.run(serve())


@contextlib.contextmanager
def fake_process(script: Path) -> Iterator[str]:
    """``script fake PORT`` in its own process, pinned with the load generator (core 1);
    yields its origin once ``/healthz`` answers."""
    port = free_port()
    with serving([*PIN_CLIENT, sys.executable, str(script), "fake", str(port)],
                 f"http://127.0.0.1:{port}/healthz", stop_timeout=10) as origin:
        yield origin


@contextlib.contextmanager
def serving(cmd: list[str], probe: str, *, cwd: Path | None = None,
            procs: list[subprocess.Popen[bytes]] | None = None,
            stop_timeout: float = 30) -> Iterator[str]:
    """Run a server process until the block ends; ready once ``probe`` answers 200.

    Yields the probe's origin (``http://host:port``); the ``Popen`` is appended to
    ``procs`` when given (memory sections read its pid).
    """
    # This checkout's gateway, not whichever one the venv has installed in editable
    # mode (a worktree, or a copy of the repository, would otherwise bench another).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    if procs is not None:
        procs.append(proc)
    try:
        wait_http(probe, proc=proc)
        url = urllib.parse.urlsplit(probe)
        yield f"{url.scheme}://{url.netloc}"
    finally:
        stop_process(proc, stop_timeout)


@contextlib.contextmanager
def _nginx(root: Path, server: str, probe: str, http: str = "") -> Iterator[str]:
    """nginx (1 worker, pinned like the gateway) with one ``server`` block on a free port;
    ``probe`` is a path that answers 200 once it is up."""
    port = free_port()
    conf = root / "nginx.conf"
    conf.write_text(f"""
daemon off; worker_processes 1; pid {root}/nginx.pid; error_log {root}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  {http}
  server {{
    listen 127.0.0.1:{port};
    {server}
  }}
}}
""")
    with serving([*PIN_SERVER, "nginx", "-c", str(conf), "-p", str(root)],
                 f"http://127.0.0.1:{port}{probe}", stop_timeout=10) as origin:
        yield origin


@contextlib.contextmanager
def nginx_static(files: dict[str, bytes]) -> Iterator[str]:
    """nginx (1 worker, pinned like the gateway) serving ``files`` statically."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        root.chmod(0o755)  # nginx workers drop to an unprivileged user
        (root / "www").mkdir()
        for name, data in files.items():
            (root / "www" / name).write_bytes(data)
        with _nginx(root, f"""
    root {root}/www;
    default_type application/json;
    # static files answer GET; map POST to GET so the load is the same as the gateway's
    error_page 405 =200 $uri;""", f"/{next(iter(files))}") as url:
            yield url


@contextlib.contextmanager
def nginx_proxy(upstream: str, probe: str = "/healthz") -> Iterator[str]:
    """nginx ``proxy_pass`` to ``upstream`` (``http://host:port``): keep-alive to the
    upstream, request and response buffered in memory (no temp files)."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        root.chmod(0o755)
        with _nginx(root, """
    client_max_body_size 8m;
    client_body_buffer_size 8m;
    location / {
      proxy_pass http://bench_upstream;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffer_size 64k;
      proxy_buffers 64 64k;
      proxy_busy_buffers_size 128k;
    }""", probe, http=f"upstream bench_upstream {{ server {upstream.split('//', 1)[1]}; "
                         "keepalive 64; }") as url:
            yield url


@contextlib.contextmanager
def gateway_process(raw: dict[str, Any], tmp: Path,
                    procs: list[subprocess.Popen[bytes]] | None = None) -> Iterator[str]:
    """A real gateway pinned like nginx; its ``Popen`` is appended to ``procs`` if given."""
    port = free_port()
    raw = {**raw, "server": {**raw["server"], "port": port}}
    cfg = tmp / "bench.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    with serving([*PIN_SERVER, sys.executable, "-m", "gateway", "serve", "--config",
                  str(cfg)], f"http://127.0.0.1:{port}/healthz", cwd=tmp,
                 procs=procs) as origin:
        yield origin


@contextlib.contextmanager
def floor_server(body: Path, *extra: str) -> Iterator[str]:
    """``floor_server.py`` pinned like the gateway: read the upload, answer ``body``."""
    port = free_port()
    with serving([*PIN_SERVER, sys.executable, str(Path(__file__).with_name("floor_server.py")),
                  str(port), str(body), *extra],
                 f"http://127.0.0.1:{port}/healthz") as origin:
        yield origin


HIT_REPEATS = 3


def _spread(values: list[float]) -> str:
    return f"{min(values):.0f}-{max(values):.0f}"


def bench_cache_hits(seconds: int = 5) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        lua = tmp / "post.lua"
        lua.write_text(WRK_LUA)
        image = photo_png(512)
        # Logging as in production (one JSON line per request, to a discarded stream).
        with gateway_process(raw_config(tmp, logging={"level": "info", "format": "json"}),
                             tmp) as gw:
            bodies = {}
            for fmt in ("url", "b64_json"):
                body = multipart_body({"n": "1", "size": "512x512", "response_format": fmt,
                                       "user": END_USER}, image, BOUNDARY)
                (tmp / f"{fmt}.body").write_bytes(body)
                # Prime the cache and capture the exact response bytes for nginx.
                import urllib.request

                req = urllib.request.Request(
                    gw + "/v1/images/variations", data=body,
                    headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
                with urllib.request.urlopen(req) as r:
                    bodies[fmt] = r.read()
            results: dict[tuple[str, str, int], dict[str, float]] = {}
            throughput: dict[tuple[str, str], list[float]] = {}
            failed: dict[tuple[str, str], int] = {}
            # Both servers stay up (the idle one costs nothing) and take turns, so a
            # drift of the machine over the run hits both sides of each ratio alike.
            with nginx_static({f"{k}.json": v for k, v in bodies.items()}) as ng:
                targets = {"gateway": lambda fmt: gw + "/v1/images/variations",
                           "nginx": lambda fmt: f"{ng}/{fmt}.json"}
                for fmt in ("url", "b64_json"):
                    env = {"BENCH_BODY": str(tmp / f"{fmt}.body"),
                           "BENCH_BOUNDARY": BOUNDARY}
                    for server, url in targets.items():
                        results[(server, fmt, 1)] = wrk(url(fmt), 1, seconds, lua, env)
                    for _ in range(HIT_REPEATS):
                        for server, url in targets.items():
                            r = wrk(url(fmt), 16, seconds, lua, env)
                            throughput.setdefault((server, fmt), []).append(r["rps"])
                            failed[(server, fmt)] = (failed.get((server, fmt), 0)
                                                     + int(r["non2xx"]))
        # What one CPython aiohttp process can reach at all: read the upload and answer
        # the same bytes (no parsing, no state), then also hash the upload, then (url
        # only) every duty of a hit done as leanly as possible (floor_server.py).
        for fmt in ("url", "b64_json"):
            (tmp / f"{fmt}.json").write_bytes(bodies[fmt])
            env = {"BENCH_BODY": str(tmp / f"{fmt}.body"), "BENCH_BOUNDARY": BOUNDARY}
            for label, extra in (("floor", ()), ("floor+sha", ("sha256",)),
                                 ("duties", ("duties",))):
                if label == "duties" and fmt != "url":
                    continue
                with floor_server(tmp / f"{fmt}.json", *extra) as fl:
                    results[(label, fmt, 16)] = wrk(fl + "/v1/images/variations", 16,
                                                    seconds, lua, env)
    for fmt in ("url", "b64_json"):
        g1 = results[("gateway", fmt, 1)]
        n1 = results[("nginx", fmt, 1)]
        g_rps = statistics.median(throughput[("gateway", fmt)])
        n_rps = statistics.median(throughput[("nginx", fmt)])
        floor, floor_sha = results[("floor", fmt, 16)], results[("floor+sha", fmt, 16)]
        duties = results.get(("duties", fmt, 16))
        ratio = g_rps / n_rps
        why = ""
        if ratio < 0.25:
            why = (f"one pinned core spends {1e6 / g_rps:.0f} us per hit; an aiohttp "
                   f"process that only reads the 78 KB upload and answers already needs "
                   f"{1e6 / floor['rps']:.0f} us (floor ratio {floor['rps'] / n_rps:.2f})")
            if duties is not None:
                why += (f"; every duty of a hit done as leanly as I could, with no "
                        f"middleware or error handling (floor_server.py duties), needs "
                        f"{1e6 / duties['rps']:.0f} us (ratio {duties['rps'] / n_rps:.2f})")
                if duties["rps"] / n_rps < 0.25:
                    why += (", itself short of the goal: closing it needs several worker "
                            "processes on shared (Redis) state, or a goal set against "
                            "that sketch (the gateway's share of it is the column before)")
        rows.append({
            "format": fmt, "response bytes": len(bodies[fmt]),
            "gateway p50 ms (c=1)": g1["p50"], "gateway p99 ms (c=1)": g1["p99"],
            "nginx p50 ms (c=1)": n1["p50"],
            f"gateway req/s (c=16, median of {HIT_REPEATS})": g_rps,
            "gateway req/s range": _spread(throughput[("gateway", fmt)]),
            f"nginx req/s (c=16, median of {HIT_REPEATS})": n_rps,
            "nginx req/s range": _spread(throughput[("nginx", fmt)]),
            "ratio": ratio,
            "aiohttp floor req/s (c=16)": floor["rps"],
            "floor ratio": floor["rps"] / n_rps,
            "floor + SHA-256 req/s (c=16)": floor_sha["rps"],
            "floor + SHA-256 ratio": floor_sha["rps"] / n_rps,
            "duties sketch req/s (c=16)": duties["rps"] if duties else "-",
            "duties sketch ratio": duties["rps"] / n_rps if duties else "-",
            "gateway / sketch": g_rps / duties["rps"] if duties else "-",
            "non-2xx": int(g1["non2xx"]) + failed.get(("gateway", fmt), 0),
            "goal p50 < 3 ms": verdict(g1["p50"], 3.0, "ms"),
            "goal ratio >= 0.25": ("met" if ratio >= 0.25 else f"missed by {0.25 - ratio:.2f}"),
            "why": why,
        })
    return rows


# ------------------------------------------------------------------ main


def commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return rev + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    sections: list[tuple[str, Any]] = [
        ("Procedural backend: wall time per request", bench_procedural),
        ("Gateway added latency on a miss (whole request minus backend time, c=1)",
         lambda: asyncio.run(_overhead())),
        ("Cache hits, 512x512 n=1: gateway vs nginx static (same bytes)", bench_cache_hits),
    ]
    if (Path(__file__).parent / "bench_redis.py").exists():
        sections.append(("Redis-backed state next to SQLite",
                         lambda: importlib.import_module("bench_redis").run()))
    notes: dict[str, str] = {}
    if (Path(__file__).parent / "bench_load.py").exists():
        def load() -> Any:
            return importlib.import_module("bench_load")

        def overhead() -> list[dict[str, Any]]:
            rows = load().run_overhead()
            path = load().chart(rows)
            notes[overhead_title] = (f"\n![p50 latency against concurrency]({path.name})\n\n"
                                     f"Chart: `{path.relative_to(ROOT)}`.\n")
            return rows

        overhead_title = ("Gateway overhead on a miss (Cache-Control: no-store, 256x256, "
                          "zero-latency fake upstream): fake direct vs nginx proxy_pass vs "
                          "gateway under wrk; fake and wrk on core 1")
        sections += [
            (overhead_title, overhead),
            ("Memory: 100 concurrent ~4 MB uploads; RSS after 1,000 vs 20,000 requests",
             lambda: load().run_memory()),
            ("Intake: 600 concurrent held-open 3.9 MB uploads from one member (issue 19)",
             lambda: load().run_intake()),
            ("Startup (exec to first 200 on /healthz, median of 5) and idle RSS",
             lambda: load().run_startup()),
        ]
    if (Path(__file__).parent / "bench_peer.py").exists():
        def peer() -> Any:
            return importlib.import_module("bench_peer")

        sections += [
            ("Normalising one gpt-image answer (to_png): CPU ms before (full decode, "
             "Lanczos, Pillow PNG) and after (draft JPEG decode, reduce + Lanczos, "
             "encode_png)", lambda: peer().run_normalise()),
            ("gpt-image at 512x512: gateway (openai_edits) vs LiteLLM proxy "
             "(/v1/images/edits), same fake upstream; servers on core 0, wrk and fake on "
             "core 1", lambda: peer().run_peer()),
        ]
    if (Path(__file__).parent / "bench_mixed.py").exists():
        def mixed() -> Any:
            return importlib.import_module("bench_mixed")

        sections += [
            ("Mixed traffic: a team of 4 artists (+ an intern, a revoked token), 8 "
             "clients, gpt-image (jpeg 85, 1024 px answers), SQLite state; gateway on core "
             "0, client and fake on core 1", lambda: mixed().run_row()),
            ("Speed tricks A/B on the mixed-traffic row: all on vs each one off, "
             "interleaved rounds", lambda: mixed().run_ab()),
            ("Speed tricks A/B on the gpt-image row (gateway, no-store, wrk c=16)",
             lambda: mixed().run_ab_peer()),
        ]
    header = (f"# Benchmark report\n\nMeasured by `make bench` on commit `{commit()}`, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
              f"{os.cpu_count()} cores, Python {platform.python_version()}, "
              f"{platform.machine()}. Server pinned to core 0, load generator to core 1.\n")
    print(header)
    parts = [header]
    for title, fn in sections:
        started = time.monotonic()
        try:
            rows = fn()
        except Exception as exc:  # one broken section must not hide the others
            rows = [{"error": f"{type(exc).__name__}: {exc}"}]
        text = (table(title, rows) + notes.get(title, "")
                + f"\n_{time.monotonic() - started:.0f} s_\n")
        print(text, flush=True)
        parts.append(text)
    REPORT.write_text("\n".join(parts))
    print(f"written to {REPORT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
