"""gpt-image through the gateway next to LiteLLM's proxy, for ``make bench`` (issue 18).

Two tables:

- :func:`run_normalise`: CPU ms per normalised image (``to_png``) before and after the
  speed-up, per upstream format and target size (``bench_normalise.py``).
- :func:`run_peer`: the gateway's ``POST /v1/images/variations`` at 512x512 through an
  ``openai_edits`` backend, next to LiteLLM's proxy relaying ``POST /v1/images/edits``,
  both against the same fake gpt-image upstream (:func:`fake_main`). Each server is
  pinned to core 0; wrk and the fake to core 1. c=1 (p50) and c=16 (req/s), median of
  runs taken in turns (all servers stay up, so a drift of a shared machine hits every
  row alike), the server's CPU ms per request (from /proc, steadier than wall time on
  a busy machine), and each server's RSS after the runs.

The gateway asks the upstream for ``output_format: jpeg`` (it resizes anyway); LiteLLM
relays whatever its client asks for, so it is measured both with the upstream's
default (PNG, ~1.9 MB of base64 JSON per image) and with ``output_format=jpeg`` (the
same upstream bytes as the gateway gets). Ratios are against the faster LiteLLM run.

LiteLLM is installed on first use into ``var/bench-litellm`` (``pip install
'litellm[proxy]'``; ``var/`` is not committed); without it the table says why.

``python tests/perf/bench_peer.py fake PORT DEFAULT_FORMAT`` runs the fake (internal).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench
import bench_load
import bench_normalise
from bench import BOUNDARY, PIN_SERVER, free_port, multipart_body

ROOT = Path(__file__).resolve().parents[2]
LITELLM_VENV = ROOT / "var" / "bench-litellm"
LITELLM_KEY = "sk-litellm-bench"  # general_settings.master_key: the proxy needs one
MODEL = "gpt-image-1-mini"
SECONDS = 4
REPEATS = 3
GATEWAY_TOKEN = "vg-bench-member-token"


# ------------------------------------------------------------------ fake upstream


def fake_main(port: int) -> None:
    """A zero-latency gpt-image ``POST /v1/images/edits``.

    Follows /work/shared/reference/backends.md, "gpt-image through /v1/images/edits"
    (openai/openai-openapi ``CreateImageEditRequest``): multipart in; ``n``; the answer
    is ``{"created", "data": [{"b64_json"}], "usage", "size", "quality",
    "output_format", "background"}``, never URLs; ``output_format`` png (the API's
    default), jpeg or webp with ``output_compression`` 0..100 (default 100). The image
    is a 1024x1024 photo-like picture (``bench_normalise.photo``): ~1.4 MB as PNG, as a
    real picture is (backends.md: 1.5-3 MB). A path prefix ``/{format}-{compression}``
    (``/jpeg-85/v1/images/edits``) sets the defaults for fields the client did not send,
    else png and 100 as the API's: so a gateway whose ``openai_edits`` backend has no
    ``output_format`` option yet is measured as if it had sent it. Answers are prebuilt
    per (format, compression, n), so the fake costs almost nothing; ``GET /stats``
    counts the formats answered.
    """
    picture = bench_normalise.photo()
    field = re.compile(rb'name="([a-z_]+)"\r\n(?:[^\r\n]+\r\n)*\r\n([^\r\n]{0,40})\r\n')
    bodies: dict[tuple[str, int, int], bytes] = {}
    answered: dict[str, int] = {}

    async def handler(request: web.BaseRequest) -> web.Response:
        if request.method == "GET":
            return web.json_response(answered if request.path == "/stats" else "ok")
        prefix, _, rest = request.path.partition("/v1/")
        if rest != "images/edits":
            return web.json_response({"error": {"message": "Unknown route.", "type":
                                                "invalid_request_error", "param": None,
                                                "code": None}}, status=404)
        body = await request.read()
        fields = {k.decode(): v.decode(errors="replace") for k, v in field.findall(body)
                  if k != b"image"}
        default_format, _, default_compression = (prefix.strip("/") or "png-100").partition("-")
        fmt = fields.get("output_format", default_format)
        compression = int(fields.get("output_compression", default_compression))
        n = min(10, max(1, int(fields.get("n", "1"))))
        key = (fmt, compression, n)
        if key not in bodies:
            b64 = base64.b64encode(bench_normalise.encode(picture, fmt, compression)).decode()
            bodies[key] = json.dumps({
                "created": int(time.time()), "data": [{"b64_json": b64}] * n,
                "usage": {"input_tokens": 50, "output_tokens": 272 * n,
                          "total_tokens": 50 + 272 * n,
                          "input_tokens_details": {"text_tokens": 10, "image_tokens": 40}},
                "size": "1024x1024", "quality": "low", "output_format": fmt,
                "background": "opaque"}).encode()
        label = f"{fmt} q{compression}" if fmt != "png" else fmt
        answered[label] = answered.get(label, 0) + 1
        return web.Response(body=bodies[key], content_type="application/json")

    bench.serve_forever(handler, port)


def fake_upstream() -> contextlib.AbstractContextManager[str]:
    """The fake in its own process, pinned with the load generator (core 1)."""
    return bench.fake_process(Path(__file__))


def answered(fake: str) -> dict[str, int]:
    import urllib.request

    with urllib.request.urlopen(fake + "/stats", timeout=10) as r:
        return dict(json.load(r))


# ------------------------------------------------------------------ servers


def edits_has_output_format() -> bool:
    """Whether this commit's ``openai_edits`` backend has the ``output_format`` option."""
    from dataclasses import fields

    from gateway.backends.openai.edits import OpenAIEditsOptions

    return "output_format" in {f.name for f in fields(OpenAIEditsOptions)}


def gateway_config(tmp: Path, fake: str) -> dict[str, Any]:
    """Token auth with one member, quotas and audit on (limits high enough never to
    refuse), the default cache (bypassed: the load sends ``Cache-Control: no-store``,
    so every request reaches the upstream). Backend ``gpt-image`` (the route) asks for
    jpeg at the API's default compression (100), ``gpt-image-q85`` (pinned by
    ``model``) for jpeg at 85."""
    import hashlib

    backends = []
    for name, compression in (("gpt-image", 100), ("gpt-image-q85", 85)):
        backend: dict[str, Any] = {
            "name": name, "kind": "openai_edits", "model": MODEL, "quality": "low",
            "base_url": f"{fake}/jpeg-{compression}/v1",  # the fake's defaults
            "api_key": "sk-bench", "retry": {"max_attempts": 1}}
        if edits_has_output_format():
            backend.update(output_format="jpeg", output_compression=compression)
        backends.append(backend)
    return bench.raw_config(
        tmp, auth={"mode": "tokens"},
        users={"artist": {"token_sha256": hashlib.sha256(GATEWAY_TOKEN.encode()).hexdigest()}},
        quota_defaults={"images_per_day": 10_000_000, "requests_per_minute": 10_000_000,
                        "max_concurrent": 1000},
        logging={"level": "info", "format": "json"},
        backends=backends, route=["gpt-image"])


def litellm_ready() -> str:
    """``''`` when LiteLLM's proxy is installed in ``var/bench-litellm`` (installing it
    on first use), else why not."""
    exe = LITELLM_VENV / "bin" / "litellm"
    if exe.exists():
        return ""
    try:
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True,
                       capture_output=True, timeout=300)
        subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "--quiet",
                        "litellm[proxy]"], check=True, capture_output=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as exc:
        err = getattr(exc, "stderr", b"") or b""
        return f"pip install 'litellm[proxy]' failed: {exc} {err.decode()[-300:]}"
    return "" if exe.exists() else "litellm[proxy] installed no litellm command"


@contextlib.contextmanager
def litellm_proxy(tmp: Path, fake: str, procs: list[subprocess.Popen[bytes]]
                  ) -> Iterator[str]:
    """LiteLLM's proxy (one uvicorn worker, pinned like the gateway): one model entry
    whose ``openai/`` provider points at the fake."""
    cfg = tmp / "litellm.yaml"
    cfg.write_text(json.dumps({
        "model_list": [{"model_name": MODEL, "litellm_params": {
            "model": f"openai/{MODEL}", "api_base": fake + "/v1", "api_key": "sk-bench"}}],
        "general_settings": {"master_key": LITELLM_KEY},
        "litellm_settings": {"set_verbose": False, "json_logs": True},
    }))
    port = free_port()
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
           "NO_DOCS": "True"}
    proc = subprocess.Popen(
        [*PIN_SERVER, str(LITELLM_VENV / "bin" / "litellm"), "--config", str(cfg),
         "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
        cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(proc)
    try:
        bench.wait_http(f"http://127.0.0.1:{port}/health/liveliness", 120, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        bench.stop_process(proc, 30)


# ------------------------------------------------------------------ load


WRK_LUA = bench.WRK_LUA  # BENCH_TOKEN set: the Authorization header goes along


def edits_body(upload: bytes, output_format: str) -> bytes:
    """What an OpenAI SDK client sends to ``/v1/images/edits`` (for LiteLLM)."""
    fields = {"model": MODEL, "prompt": "A close variation of this image.", "n": "1",
              "size": "1024x1024", "quality": "low", "output_format": output_format}
    return multipart_body(fields, upload, BOUNDARY)


def run_peer(seconds: int = SECONDS, repeats: int = REPEATS) -> list[dict[str, Any]]:
    why_not = litellm_ready()
    upload = bench.photo_png(512)  # the artist's layer
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        lua = tmp / "post.lua"
        lua.write_text(WRK_LUA)
        bodies = {
            "gateway": multipart_body({"n": "1", "size": "512x512",
                                       "response_format": "b64_json",
                                       "user": bench.END_USER}, upload, BOUNDARY),
            "gateway q85": multipart_body({"n": "1", "size": "512x512",
                                           "response_format": "b64_json",
                                           "user": bench.END_USER, "model": "gpt-image-q85"},
                                          upload, BOUNDARY),
            "litellm png": edits_body(upload, "png"),
            "litellm jpeg": edits_body(upload, "jpeg"),
        }
        envs = {}
        for name, body in bodies.items():
            (tmp / f"{name}.body").write_bytes(body)
            ours = name.startswith("gateway")
            envs[name] = {"BENCH_BODY": str(tmp / f"{name}.body"), "BENCH_BOUNDARY": BOUNDARY,
                          "BENCH_TOKEN": GATEWAY_TOKEN if ours else LITELLM_KEY,
                          "BENCH_CACHE_CONTROL": "no-store" if ours else ""}
        option = edits_has_output_format()
        runs: dict[str, dict[int, list[dict[str, float]]]] = {n: {1: [], 16: []} for n in bodies}
        cpu_ms: dict[str, list[float]] = {n: [] for n in bodies}
        formats: dict[str, dict[str, int]] = {n: {} for n in bodies}
        with contextlib.ExitStack() as stack:
            fake = stack.enter_context(fake_upstream())
            origins: dict[str, tuple[str, int]] = {}
            procs: list[subprocess.Popen[bytes]] = []
            origin = stack.enter_context(
                bench.gateway_process(gateway_config(tmp, fake), tmp, procs))
            origins["gateway"] = (origin + "/v1/images/variations", procs[-1].pid)
            if not why_not:
                origin = stack.enter_context(litellm_proxy(tmp, fake, procs))
                origins["litellm"] = (origin + "/v1/images/edits", procs[-1].pid)
            names = [n for n in bodies if n.split()[0] in origins]
            for name in names:  # warm up connections and sessions
                bench.wrk(origins[name.split()[0]][0], 4, 1, lua, envs[name])
            # Both servers stay up (the idle one costs nothing) and take turns, so a
            # drift of the (shared) machine over the run hits every row alike.
            for _ in range(repeats):
                for name in names:
                    url, pid = origins[name.split()[0]]
                    before = answered(fake)
                    runs[name][1].append(bench.wrk(url, 1, seconds, lua, envs[name]))
                    cpu = bench_load.cpu_seconds(pid)
                    r = bench.wrk(url, 16, seconds, lua, envs[name])
                    runs[name][16].append(r)
                    cpu_ms[name].append((bench_load.cpu_seconds(pid) - cpu) * 1000
                                        / max(1.0, r["rps"] * seconds))
                    after = answered(fake)
                    for k, v in after.items():
                        formats[name][k] = formats[name].get(k, 0) + v - before.get(k, 0)
            rss = {server: bench_load.mb(bench_load.total_rss_kb(pid))
                   for server, (_, pid) in origins.items()}
        results: dict[str, dict[str, Any]] = {}
        for name in names:
            c1, c16 = runs[name][1], runs[name][16]
            results[name] = {
                "p50": statistics.median(r["p50"] for r in c1),
                "p99": statistics.median(r["p99"] for r in c1),
                "rps": statistics.median(r["rps"] for r in c16),
                "rps range": bench._spread([r["rps"] for r in c16]),
                "cpu": statistics.median(cpu_ms[name]),
                "rss": rss[name.split()[0]],
                "non2xx": int(sum(r["non2xx"] for r in c1 + c16)),
                # In-flight requests of the previous row may land in this one's count.
                "upstream": ", ".join(f"{k} x{v}" for k, v in formats[name].items() if v),
            }
    return _rows(results, why_not, option)


def _rows(results: dict[str, dict[str, Any]], why_not: str, option: bool
          ) -> list[dict[str, Any]]:
    peers = [r for k, r in results.items() if k.startswith("litellm")]
    best_p50 = min((r["p50"] for r in peers), default=float("nan"))
    best_rps = max((r["rps"] for r in peers), default=float("nan"))
    labels = {
        "gateway": "gateway: POST /v1/images/variations 512x512 -> openai_edits "
                   "jpeg (token auth, quotas, audit, no-store)" + ("" if option else
                                                   " [jpeg by the fake's default: "
                                                   "no output_format option on this commit]"),
        "gateway q85": "the same, upstream output_compression 85",
        "litellm png": "LiteLLM proxy: POST /v1/images/edits, output_format=png (API default)",
        "litellm jpeg": "LiteLLM proxy: POST /v1/images/edits, output_format=jpeg",
    }
    rows = []
    for name, label in labels.items():
        r = results.get(name)
        if r is None:
            if name != "gateway":
                rows.append({"server": label, "upstream answers": f"not run: {why_not}"})
            continue
        row: dict[str, Any] = {
            "server": label, "upstream answers": r["upstream"],
            f"p50 ms c=1 (median of {REPEATS})": r["p50"], "p99 ms c=1": r["p99"],
            f"req/s c=16 (median of {REPEATS})": r["rps"], "req/s range": r["rps range"],
            "server CPU ms/req": r["cpu"], "RSS MB after": r["rss"], "non-2xx": r["non2xx"],
        }
        if name.startswith("gateway"):
            p50_ratio = best_p50 / r["p50"] if peers else float("nan")
            rps_ratio = r["rps"] / best_rps if peers else float("nan")
            row["p50 ratio (LiteLLM best / gateway; >= 1 is the goal)"] = p50_ratio
            row["req/s ratio (gateway / LiteLLM best; >= 1 is the goal)"] = rps_ratio
            row["goal"] = ("not measured" if not peers else
                           "met" if p50_ratio >= 1 and rps_ratio >= 1 else "missed")
        rows.append(row)
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    return [{k: row.get(k, "") for k in keys} for row in rows]


# ------------------------------------------------------------------ normalise


def run_normalise(runs: int = 9) -> list[dict[str, Any]]:
    """CPU ms of one ``to_png`` call before (full decode, Lanczos, Pillow's PNG encoder)
    and after (draft JPEG decode, reduce + Lanczos, ``encode_png``)."""
    from gateway.backends.normalise import to_png

    img = bench_normalise.photo()
    sources = {"png": bench_normalise.encode(img, "png"),
               "jpeg q100": bench_normalise.encode(img, "jpeg", 100),
               "jpeg q85": bench_normalise.encode(img, "jpeg", 85),
               "webp q85": bench_normalise.encode(img, "webp", 85)}
    rows = []
    for label, data in sources.items():
        for size in (256, 512, 1024):
            before = bench_normalise.cpu_ms(
                lambda d=data, s=size: bench_normalise.previous_to_png(d, s), runs)
            after = bench_normalise.cpu_ms(lambda d=data, s=size: to_png("b", d, s), runs)
            rows.append({
                "upstream answer (1024x1024)": f"{label}, {len(data) // 1024} KB",
                "to": f"{size}x{size} PNG", "before CPU ms": before, "after CPU ms": after,
                "speed-up": before / after,
                "stored PNG KB before/after": (
                    f"{len(bench_normalise.previous_to_png(data, size)) // 1024}/"
                    f"{len(to_png('b', data, size)) // 1024}"),
            })
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["fake"]:
        fake_main(int(sys.argv[2]))
    else:
        for title, fn in (("normalise", run_normalise), ("peer", run_peer)):
            print(bench.table(title, fn()))
