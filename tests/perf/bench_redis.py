"""Redis-backed state next to SQLite, for ``make bench`` (``run()`` returns table rows).

Two figures:

- the state round trips of one generated request (admit, reserve, commit, count, usage),
  timed in-process against ``SqliteQuota`` and ``RedisQuota`` on a local redis-server:
  p50/p99 of what the state store adds to a request;
- admitted requests per second for one hot user (n=1, ``Cache-Control: no-store``, so
  every request reserves and commits): one SQLite gateway vs two Redis replicas, the
  load split over both. Gateways and client share this machine's cores.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from redis_server import REDIS_SERVER, RedisServer  # noqa: E402
from support import GatewayProcess, auth, base_config, png_bytes, start_gateway  # noqa: E402

from gateway.auth import Principal  # noqa: E402
from gateway.config import QuotaLimits  # noqa: E402
from gateway.quota import QuotaStore  # noqa: E402
from gateway.quota.redis import RedisQuota  # noqa: E402
from gateway.quota.sqlite import SqliteQuota  # noqa: E402
from gateway.redis.client import connect  # noqa: E402

CALLS = 2000
LOAD_SECONDS = 6.0
CONCURRENCY = 32


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def _round_trips(store: QuotaStore) -> list[float]:
    p = Principal("hot", QuotaLimits(images_per_day=None, requests_per_minute=None,
                                     max_concurrent=None), True)
    out = []
    for _ in range(CALLS):
        started = time.perf_counter()
        async with store.admit(p):
            r = await store.reserve(p, 1, 0.016, "256x256")
            await store.commit(r, 1, 0.016)
            await store.count_request(p, cache_hit=False)
            await store.usage(p)
        out.append((time.perf_counter() - started) * 1000)
    await store.close()
    return out


def _row(measure: str, state: str, ms: list[float] | None = None,
         per_s: float | None = None) -> dict[str, object]:
    return {"measure": measure, "state": state,
            "p50_ms": round(statistics.median(ms), 3) if ms else "",
            "p99_ms": round(_pct(ms, 99), 3) if ms else "",
            "per_s": round(per_s, 1) if per_s is not None else ""}


async def _load(urls: list[str]) -> float:
    """Admitted (200) requests per second over ``LOAD_SECONDS``, spread over ``urls``."""
    image = png_bytes(32)
    admitted = 0
    stop_at = time.monotonic() + LOAD_SECONDS

    async def worker(i: int, session: aiohttp.ClientSession) -> None:
        nonlocal admitted
        while time.monotonic() < stop_at:
            form = aiohttp.FormData()
            form.add_field("image", image, filename="a.png", content_type="image/png")
            form.add_field("size", "256x256")
            async with session.post(urls[i % len(urls)] + "/v1/images/variations",
                                    data=form, headers={**auth(), "Cache-Control":
                                                        "no-store"}) as resp:
                await resp.read()
                admitted += resp.status == 200

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        started = time.monotonic()
        await asyncio.gather(*(worker(i, session) for i in range(CONCURRENCY)))
        return admitted / (time.monotonic() - started)


def _gateways(tmp: Path, redis_url: str | None, count: int) -> list[GatewayProcess]:
    out = []
    for i in range(count):
        own = tmp / f"g{i}"
        state = ({"kind": "redis", "redis_url": redis_url, "timeout_seconds": 5.0}
                 if redis_url else {"kind": "sqlite", "path": str(own / "state.sqlite3")})
        raw = base_config(own, state=state, cache={"dir": str(tmp / "cache")},
                          images={"dir": str(tmp / "images")},
                          quota_defaults={"images_per_day": None, "images_per_month": None,
                                          "requests_per_minute": None, "max_concurrent": None},
                          logging={"level": "warning"})
        out.append(start_gateway(raw, own))
    return out


def run() -> list[dict[str, object]]:
    if not Path(REDIS_SERVER).exists():
        return [{"error": "redis-server is not installed"}]
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        server = RedisServer(tmp / "redis")
        server.start()
        try:
            trips = "state calls of one generated request (in-process)"
            rows.append(_row(trips, "sqlite", asyncio.run(
                _round_trips(SqliteQuota(tmp / "bench.sqlite3")))))
            redis_store = RedisQuota(connect(server.url, 5.0), 5.0, lease_seconds=600)
            rows.append(_row(trips, "redis (loopback)",
                             asyncio.run(_round_trips(redis_store))))
            load = f"admitted n=1 requests/s, one hot user, {CONCURRENCY} clients"
            for label, url, count in (("sqlite, 1 gateway", None, 1),
                                      ("redis, 2 replicas", server.url, 2)):
                gateways = _gateways(tmp / label.replace(" ", "_"), url, count)
                try:
                    rows.append(_row(load, label,
                                     per_s=asyncio.run(_load([g.url for g in gateways]))))
                finally:
                    for g in gateways:
                        g.stop()
        finally:
            server.stop()
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
