"""A team's mixed traffic against a real gateway, for ``make bench``: speed per request
kind, and an A/B of each kept speed trick on that traffic.

The guide's rule: a speed trick stays only if a realistic row shows it pays (5% or
more). The cache-hit rows measure one request shape at a time; this row is a studio
team's working day compressed:

- a real gateway process (``python -m gateway serve``; SQLite state, quota ledger and
  audit; token auth; logging as in production), pinned to core 0;
- the gpt-image path (``openai_edits``, jpeg at 85 as the example config asks) against
  the fake gpt-image upstream of the peer row (``bench_peer.fake_main``: a 1024 px
  photo-like answer), the fake and this client on core 1;
- four artists with a few recent 512 px photo-like layers each (``photo_like`` of
  tests/fakes_upstreams.py, ~400 KB PNG, as a layer export is), one intern over their
  minute limit, and a stale token; 8 clients at once (the team's plug-ins and scripts).

:func:`run_row` measures the row (all tricks on, median of :data:`ROW_REPEATS` runs);
:func:`run_ab` runs the gateway once per trick with that trick switched off, in rounds
(on, a off, b off, c off, d off; again...), so a drift of the shared machine hits every
side alike, and reports each trick's gain from the pairs of each round.

A trick is switched off without touching production code: ``b64_memo`` by the config
(``cache.memory_bytes: 0``), the others by :func:`switch_off`, which patches the classes
in the bench's own gateway process (``python bench_mixed.py serve OFF CONFIG``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench
import bench_load
import bench_peer
from bench import BOUNDARY, PIN_SERVER, free_port, multipart_body
from fakes_upstreams import photo_like

# What one team's traffic is made of, per 100 requests, and why. The GIMP plug-in asks
# for b64_json; an artist mostly re-runs the layers they are working on ("More like
# this", another size), so most requests are hits on a few recent uploads; scripts and
# the SDK ask for url. A new layer (a miss that generates) is one request in ten: more
# would make the team's day mostly waiting on gpt-image. The plug-in reads /v1/usage
# when its settings are saved and dashboards poll it. Refusals happen but are rare: an
# intern clicking past their minute limit (429) and a machine with a revoked token (401).
MIX = (("hit b64_json", 50), ("hit url", 15), ("miss (new upload)", 10),
       ("usage poll", 15), ("429 (minute limit)", 6), ("401 (revoked token)", 4))
ARTISTS = 4
RECENT = 4  # recent layers per artist, each primed (generated, then hit once per format)
CLIENTS = 8
TOTAL = 1500  # requests per run: ~7 s on one pinned core
ROW_REPEATS = 3
AB_ROUNDS = 5
EDGE = 512
TRICKS = {
    "group_commit": ("(a) group commit of SQLite writes", "gateway/sqlite.py GroupCommit",
                     "each write in a transaction of its own (ledger additions too)"),
    "pixel_memo": ("(c) upload -> pixel-hash memo", "gateway/png.py PixelHashes",
                   "the memo never answers (each upload inspected and decoded)"),
    "b64_memo": ("(d) base64 memo", "gateway/render.py Base64Memo",
                 "config cache.memory_bytes: 0"),
}


def token(name: str) -> str:
    return f"vg-bench-{name}-token"


# ------------------------------------------------------------------ server


def gateway_config(tmp: Path, fake: str, off: frozenset[str]) -> dict[str, Any]:
    members = {f"artist{i}": {"token_sha256": hashlib.sha256(token(f"artist{i}").encode())
                              .hexdigest()} for i in range(ARTISTS)}
    members["intern"] = {"token_sha256": hashlib.sha256(token("intern").encode()).hexdigest(),
                         "quota": {"requests_per_minute": 1}}
    backend = {"name": "gpt-image", "kind": "openai_edits", "model": bench_peer.MODEL,
               "quality": "low", "base_url": f"{fake}/v1", "api_key": "sk-bench",
               "output_format": "jpeg", "output_compression": 85,
               "retry": {"max_attempts": 1}}
    raw = bench.raw_config(
        tmp, auth={"mode": "tokens"}, users=members,
        quota_defaults={"images_per_day": 1_000_000, "requests_per_minute": 1_000_000,
                        "max_concurrent": 100},
        logging={"level": "info", "format": "json"}, backends=[backend], route=["gpt-image"])
    return raw


def switch_off(off: frozenset[str]) -> None:
    """Patch the gateway's classes, in this (bench) process only, as if tricks (a) and
    (c) had never been made. (b), the in-memory ledger and pools, was measured here and
    removed (+1.5% req/s): its switch went with it."""
    if "group_commit" in off:
        from gateway import sqlite
        from gateway.quota.sqlite import SqliteQuota

        def flush_each(self: sqlite.GroupCommit) -> None:
            pending, self._pending = self._pending, []
            for write, on_commit, done in pending:
                try:
                    self._transaction([write])
                except Exception as exc:
                    sqlite._settle(done, exc)
                else:
                    sqlite._committed(on_commit, done)

        add = SqliteQuota._add

        def add_alone(self: SqliteQuota, *args: Any, **kwargs: Any) -> Any:
            self._batch = None  # no summing of one turn's additions either
            return add(self, *args, **kwargs)

        sqlite.GroupCommit._flush = flush_each  # type: ignore[method-assign]
        SqliteQuota._add = add_alone  # type: ignore[method-assign]
    if "pixel_memo" in off:
        from gateway.png import PixelHashes

        PixelHashes.get = lambda self, upload_sha256: None  # type: ignore[method-assign]
        PixelHashes.put = lambda self, upload_sha256, known: None  # type: ignore[method-assign]


def serve_main(off: str, config: str) -> int:
    switch_off(frozenset(filter(None, off.split(","))))
    from gateway.cli import main

    return main(["serve", "--config", config])


@contextlib.contextmanager
def gateway(tmp: Path, fake: str, off: frozenset[str], raw: dict[str, Any] | None = None
            ) -> Iterator[tuple[str, int]]:
    """This bench's gateway process (``raw``: this row's config) with ``off`` tricks
    switched off: (origin, pid)."""
    port = free_port()
    raw = gateway_config(tmp, fake, off) if raw is None else raw
    if "b64_memo" in off:
        raw["cache"] = {**raw["cache"], "memory_bytes": 0}
    raw["server"] = {**raw["server"], "port": port}
    cfg = tmp / "bench.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    procs: list[subprocess.Popen[bytes]] = []
    with bench.serving([*PIN_SERVER, sys.executable, str(Path(__file__).resolve()), "serve",
                        ",".join(sorted(off)) or "-", str(cfg)],
                       f"http://127.0.0.1:{port}/healthz", cwd=tmp, procs=procs) as origin:
        yield origin, procs[0].pid


# ------------------------------------------------------------------ traffic


@dataclass(frozen=True)
class Call:
    kind: str
    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""


@dataclass
class Images:
    """The team's uploads: recent layers per artist, and new ones (each a miss once)."""

    recent: list[list[bytes]]
    new: list[bytes]

    @classmethod
    def make(cls, new: int) -> Images:
        recent = [[photo_like(EDGE, EDGE, a * RECENT + i) for i in range(RECENT)]
                  for a in range(ARTISTS)]
        return cls(recent, [photo_like(EDGE, EDGE, 10_000 + i) for i in range(new)])


def variation(kind: str, who: str, image: bytes, fmt: str) -> Call:
    body = multipart_body({"n": "1", "size": f"{EDGE}x{EDGE}", "response_format": fmt,
                           "user": who}, image, BOUNDARY)
    return Call(kind, "POST", "/v1/images/variations", {
        "Authorization": f"Bearer {token(who)}",
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}, body)


def schedule(images: Images, total: int = TOTAL, seed: int = 20) -> list[Call]:
    """``total`` calls in the proportions of :data:`MIX`, shuffled (the same every run)."""
    rng = random.Random(seed)
    kinds = [k for k, share in MIX for _ in range(round(total * share / 100))]
    rng.shuffle(kinds)
    fresh = iter(images.new)
    calls = []
    for kind in kinds:
        a = rng.randrange(ARTISTS)
        layer = rng.choice(images.recent[a])
        if kind.startswith("hit"):
            calls.append(variation(kind, f"artist{a}", layer, kind.split()[1]))
        elif kind.startswith("miss"):
            calls.append(variation(kind, f"artist{a}", next(fresh), "b64_json"))
        elif kind.startswith("usage"):
            calls.append(Call(kind, "GET", "/v1/usage",
                              {"Authorization": f"Bearer {token(f'artist{a}')}"}))
        elif kind.startswith("429"):
            calls.append(variation(kind, "intern", layer, "b64_json"))
        else:
            call = variation(kind, f"artist{a}", layer, "b64_json")
            call.headers["Authorization"] = "Bearer vg-bench-revoked-token"
            calls.append(call)
    return calls


def new_uploads(total: int = TOTAL) -> int:
    return round(total * dict(MIX)["miss (new upload)"] / 100)


@dataclass
class Run:
    seconds: float
    cpu_ms: float  # the gateway's CPU per request
    latency: dict[str, list[float]] = field(default_factory=dict)
    outcomes: dict[str, dict[str, int]] = field(default_factory=dict)

    def every(self) -> list[float]:
        return [ms for kind in self.latency.values() for ms in kind]

    @property
    def rps(self) -> float:
        return sum(map(len, self.latency.values())) / self.seconds


async def _send(http: aiohttp.ClientSession, origin: str, call: Call) -> tuple[str, float]:
    started = time.perf_counter()
    async with http.request(call.method, origin + call.path, headers=call.headers,
                            data=call.body or None) as r:
        await r.read()
        outcome = f"{r.status}" + (f" {r.headers['X-Cache']}" if "X-Cache" in r.headers
                                   else "")
    return outcome, (time.perf_counter() - started) * 1000


async def _prime(http: aiohttp.ClientSession, origin: str, images: Images) -> None:
    """The team's recent layers generated and then served once in each format (memos
    keep things from their second use on); the intern's one request of the minute."""
    for a, layers in enumerate(images.recent):
        for layer in layers:
            for fmt in ("b64_json", "b64_json", "url"):
                await _send(http, origin, variation("prime", f"artist{a}", layer, fmt))
    await _send(http, origin, variation("prime", "intern", images.recent[0][0], "url"))


async def _drive(origin: str, pid: int, images: Images, calls: list[Call]) -> Run:
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=CLIENTS),
            timeout=aiohttp.ClientTimeout(total=60)) as http:
        await _prime(http, origin, images)
        queue = iter(calls)
        run = Run(0.0, 0.0)

        async def client() -> None:
            for call in queue:
                outcome, ms = await _send(http, origin, call)
                run.latency.setdefault(call.kind, []).append(ms)
                counts = run.outcomes.setdefault(call.kind, {})
                counts[outcome] = counts.get(outcome, 0) + 1

        cpu = bench_load.cpu_seconds(pid)
        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(CLIENTS)))
        run.seconds = time.perf_counter() - started
        run.cpu_ms = (bench_load.cpu_seconds(pid) - cpu) * 1000 / len(calls)
    return run


def one_run(fake: str, images: Images, calls: list[Call], off: frozenset[str]) -> Run:
    """A fresh gateway (empty state), primed, then ``calls`` from :data:`CLIENTS`."""
    with tempfile.TemporaryDirectory() as d, gateway(Path(d), fake, off) as (origin, pid), \
            bench_load.client_core():
        return asyncio.run(_drive(origin, pid, images, calls))


# ------------------------------------------------------------------ tables


def run_row(repeats: int = ROW_REPEATS) -> list[dict[str, Any]]:
    images = Images.make(new_uploads())
    calls = schedule(images)
    with bench_peer.fake_upstream() as fake:
        runs = [one_run(fake, images, calls, frozenset()) for _ in range(repeats)]
    return row_table(runs)


def row_table(runs: list[Run]) -> list[dict[str, Any]]:
    rps = [r.rps for r in runs]
    total = sum(map(len, runs[0].latency.values()))
    rows = [{"request kind": f"all ({total} requests, {CLIENTS} clients)", "share %": 100,
             "outcomes (status X-Cache: count)": "",
             f"req/s (median of {len(runs)})": statistics.median(rps),
             "req/s range": f"{min(rps):.0f}-{max(rps):.0f}",
             "p50 ms": statistics.median(bench.pct(r.every(), 50)
                                         for r in runs),
             "p95 ms": statistics.median(bench.pct(r.every(), 95)
                                         for r in runs),
             "gateway CPU ms/req": statistics.median(r.cpu_ms for r in runs)}]
    for kind, share in MIX:
        outcomes: dict[str, int] = {}
        for r in runs:
            for k, v in r.outcomes.get(kind, {}).items():
                outcomes[k] = outcomes.get(k, 0) + v
        rows.append({
            "request kind": kind, "share %": share,
            "outcomes (status X-Cache: count)": ", ".join(
                f"{k}: {v}" for k, v in sorted(outcomes.items())),
            f"req/s (median of {len(runs)})": statistics.median(
                len(r.latency[kind]) / r.seconds for r in runs),
            "req/s range": "",
            "p50 ms": statistics.median(bench.pct(r.latency[kind], 50) for r in runs),
            "p95 ms": statistics.median(bench.pct(r.latency[kind], 95) for r in runs),
            "gateway CPU ms/req": ""})
    return rows


def run_ab(rounds: int = AB_ROUNDS, tricks: tuple[str, ...] = tuple(TRICKS)
           ) -> list[dict[str, Any]]:
    """Each trick off against all on, in interleaved rounds; gains from paired runs."""
    images = Images.make(new_uploads())
    calls = schedule(images)
    sides = ["", *tricks]
    runs: dict[str, list[Run]] = {s: [] for s in sides}
    with bench_peer.fake_upstream() as fake:
        for _ in range(rounds):
            for side in sides:
                run = one_run(fake, images, calls, frozenset({side} - {""}))
                runs[side].append(run)
                print(f"{side or 'all on'}: {run.rps:.1f} req/s, {run.cpu_ms:.2f} CPU ms/req",
                      file=sys.stderr, flush=True)
    return ab_table(runs)


def ab_table(runs: dict[str, list[Run]]) -> list[dict[str, Any]]:
    on = runs[""]
    rows = []
    for name, (label, where, how) in TRICKS.items():
        if name not in runs:
            continue
        off = runs[name]
        gains = [(a.rps / b.rps - 1) * 100 for a, b in zip(on, off, strict=True)]
        cpu = [(b.cpu_ms / a.cpu_ms - 1) * 100 for a, b in zip(on, off, strict=True)]
        gain = statistics.median(gains)
        rows.append({
            "trick": label, "where": where, "off by": how,
            "req/s on (median)": statistics.median(r.rps for r in on),
            "req/s off (median)": statistics.median(r.rps for r in off),
            f"req/s gain % (median of {len(gains)} pairs)": gain,
            "gain range %": f"{min(gains):+.1f} to {max(gains):+.1f}",
            "CPU ms/req on / off": f"{statistics.median(r.cpu_ms for r in on):.2f} / "
                                   f"{statistics.median(r.cpu_ms for r in off):.2f}",
            "CPU saved % (median)": statistics.median(cpu),
            "hit b64_json p50 ms on / off": _p50s(on, off, "hit b64_json"),
            "miss p50 ms on / off": _p50s(on, off, "miss (new upload)"),
            "pays (>= 5%)": "yes" if gain >= 5 else "no",
        })
    return rows


def run_ab_peer(rounds: int = AB_ROUNDS, seconds: int = bench_peer.SECONDS
                ) -> list[dict[str, Any]]:
    """The same A/B on the gpt-image row (``bench_peer``: its gateway's first row, one
    member, ``no-store``, wrk at c=16): req/s and CPU ms/req per side, in rounds."""
    upload = bench.photo_png(512)
    sides = ["", *TRICKS]
    rps: dict[str, list[float]] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory() as d, bench_peer.fake_upstream() as fake:
        tmp = Path(d)
        lua = tmp / "post.lua"
        lua.write_text(bench.WRK_LUA)
        (tmp / "body").write_bytes(multipart_body(
            {"n": "1", "size": "512x512", "response_format": "b64_json",
             "user": bench.END_USER}, upload, BOUNDARY))
        env = {"BENCH_BODY": str(tmp / "body"), "BENCH_BOUNDARY": BOUNDARY,
               "BENCH_TOKEN": bench_peer.GATEWAY_TOKEN, "BENCH_CACHE_CONTROL": "no-store"}
        for _ in range(rounds):
            for side in sides:
                off = frozenset({side} - {""})
                with tempfile.TemporaryDirectory() as g, gateway(
                        Path(g), fake, off, bench_peer.gateway_config(Path(g), fake)
                ) as (origin, _):
                    url = origin + "/v1/images/variations"
                    bench.wrk(url, 4, 1, lua, env)  # warm-up
                    rps[side].append(bench.wrk(url, 16, seconds, lua, env)["rps"])
    rows = []
    for name, (label, _, _) in TRICKS.items():
        gains = [(a / b - 1) * 100 for a, b in zip(rps[""], rps[name], strict=True)]
        rows.append({"trick": label, "req/s on (median)": statistics.median(rps[""]),
                     "req/s off (median)": statistics.median(rps[name]),
                     f"req/s gain % (median of {len(gains)} pairs)": statistics.median(gains),
                     "gain range %": f"{min(gains):+.1f} to {max(gains):+.1f}",
                     "pays (>= 5%)": "yes" if statistics.median(gains) >= 5 else "no"})
    return rows


def _p50s(on: list[Run], off: list[Run], kind: str) -> str:
    def p50(runs: list[Run]) -> float:
        return statistics.median(bench.pct(r.latency[kind], 50) for r in runs)

    return f"{p50(on):.2f} / {p50(off):.2f}"


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        raise SystemExit(serve_main(sys.argv[2].strip("-"), sys.argv[3]))
    if sys.argv[1:2] == ["ab-peer"]:
        print(bench.table("A/B gpt-image", run_ab_peer(
            int(sys.argv[2]) if len(sys.argv) > 2 else AB_ROUNDS)))
    elif sys.argv[1:2] == ["ab"]:
        print(bench.table("A/B", run_ab(int(sys.argv[2]) if len(sys.argv) > 2 else AB_ROUNDS,
                                        *([tuple(sys.argv[3].split(","))] if len(sys.argv) > 3
                                          else []))))
    else:
        print(bench.table("mixed", run_row()))
