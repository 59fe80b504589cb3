"""The least an aiohttp process can do per cache hit: baselines for ``make bench``.

``python floor_server.py PORT BODY_FILE [sha256 | duties]`` answers ``POST`` with the
bytes of ``BODY_FILE`` and ``GET /healthz`` with 200. Modes:

- (none): read the whole upload and answer. No parsing, no auth, no state: what is left
  of the gateway's cost per hit once everything it must do is removed.
- ``sha256``: also hash the upload.
- ``duties`` (``url`` hits only): every duty of a url cache hit under the benchmark's
  config, each done the leanest way, and nothing else: frame and validate the form,
  find the upload among remembered ones by an exact comparison (for its SHA-256 and
  pixel hash), hash the end user, count the minute window, look up the pool and check
  its file's size, sign (or reuse) the URL, answer with the gateway's headers, update
  the gateway's 12 metrics, track distinct end users, write the gateway's structlog
  line, and commit the audit row (same columns and indexes) and the ledger count (two
  files, one transaction each per loop turn) before answering. No middleware,
  timeouts or error handling: a ceiling for the gateway, not a gateway.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import os
import secrets
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway import logs


def duties(body: bytes, db_dir: str) -> web.Application:
    """Every duty of a url cache hit under the benchmark's config (``auth.mode: none``,
    no limits set), each done the leanest way I know, and nothing else: no middleware,
    no timeouts, no error handling. ``body`` is unused: the answer is built per hit."""
    del body
    logs.configure("info", "json", open(os.devnull, "w"))  # noqa: SIM115
    log = structlog.get_logger("gateway.app")
    audit_db, state_db = (_open(f"{db_dir}/{name}") for name in ("audit", "state"))
    audit_db.execute(f"CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                     f"{', '.join(AUDIT_COLUMNS)})")
    for column in ("member", "end_user", "end_user_hash"):
        audit_db.execute(f"CREATE INDEX audit_{column} ON audit ({column}, id)")
    audit_db.execute("CREATE INDEX audit_ts ON audit (ts)")
    insert = (f"INSERT INTO audit ({', '.join(AUDIT_COLUMNS)}) VALUES "
              f"({', '.join('?' * len(AUDIT_COLUMNS))})")
    state_db.execute("CREATE TABLE ledger (user TEXT, period TEXT, requests INTEGER, "
                     "cache_hits INTEGER, PRIMARY KEY (user, period))")
    r = CollectorRegistry()
    requests = Counter("requests", "", ["route", "status_class", "error_code"], registry=r)
    seconds = Histogram("seconds", "", ["route"], registry=r)
    overhead = Histogram("overhead", "", ["route"], registry=r)
    in_flight = Gauge("in_flight", "", registry=r)
    upload_bytes = Histogram("upload_bytes", "", buckets=(16e3, 64e3, 256e3, 1e6, 4e6),
                             registry=r)
    lookups = Counter("lookups", "", ["result"], registry=r)
    from_cache = Counter("from_cache", "", ["size"], registry=r)
    saved = Counter("saved", "", registry=r)
    user_requests = Counter("user_requests", "", ["user"], registry=r)
    budget = Gauge("budget", "", ["user"], registry=r)
    audit_events = Counter("audit_events", "", registry=r)
    children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(metric: Any, *labels: str) -> Any:
        found = children.get((id(metric), labels))
        if found is None:
            found = children[(id(metric), labels)] = metric.labels(*labels)
        return found

    key = b"k" * 32
    known: dict[tuple[int, bytes], tuple[bytes, str, str]] = {}
    pools: dict[str, list[tuple[str, int, str]]] = {}
    urls: dict[str, tuple[float, str]] = {}
    window: collections.deque[float] = collections.deque()
    end_users: dict[str, float] = {}
    audit_rows: list[tuple[object, ...]] = []
    counts: dict[tuple[str, str], int] = {}
    waiting: list[asyncio.Future[None]] = []

    def commit() -> None:
        rows, counted, done = audit_rows[:], dict(counts), waiting[:]
        audit_rows.clear()
        counts.clear()
        waiting.clear()
        with audit_db:
            audit_db.execute("BEGIN IMMEDIATE")
            audit_db.executemany(insert, rows)
        with state_db:
            state_db.execute("BEGIN IMMEDIATE")
            state_db.executemany(
                "INSERT INTO ledger VALUES (?, ?, ?, ?) ON CONFLICT(user, period) DO UPDATE "
                "SET requests = requests + excluded.requests, "
                "cache_hits = cache_hits + excluded.cache_hits",
                [(user, period, n, n) for (user, period), n in counted.items()])
        for future in done:
            future.set_result(None)

    async def answer(request: web.Request) -> web.Response:
        started = time.perf_counter()
        request_id = "req_" + secrets.token_hex(12)
        in_flight.inc()
        member = "anonymous"
        # Parse and validate.
        upload = await request.read()
        boundary = request.headers["Content-Type"].partition("boundary=")[2].encode()
        delimiter = b"\r\n--" + boundary
        fields, pos = {}, len(boundary) + 4
        while (end := upload.find(delimiter, pos)) > 0:
            head = upload.find(b"\r\n\r\n", pos)
            name = upload[pos:head].partition(b'name="')[2].partition(b'"')[0].decode()
            fields[name] = upload[head + 4:end]
            pos = end + len(delimiter) + 2
        image = fields.pop("image")
        values = {name: raw.decode() for name, raw in fields.items()}
        n = int(values.get("n", "1"))
        size = values.get("size", "1024x1024").strip()
        response_format = values.get("response_format", "url").strip()
        model = values.get("model", "dall-e-2").strip()
        user = values.get("user")
        if (not 1 <= n <= 10 or size not in SIZES or response_format != "url"
                or model != "dall-e-2" or (user is not None and (
                    len(user) > 256 or any(ord(c) < 32 or ord(c) == 127 for c in user)))):
            raise web.HTTPBadRequest()
        upload_bytes.observe(len(image))
        # The upload's SHA-256 and pixel hash, remembered by exact bytes.
        found = known.get((len(image), image[-64:]))
        if found is None or found[0] != image:
            sha = hashlib.sha256(image).hexdigest()
            found = known[(len(image), image[-64:])] = (
                image, sha, hashlib.sha256(sha.encode()).hexdigest())
        user_hash = "vgu-" + hmac.new(key, f"{member}\0{user}".encode(),
                                      hashlib.sha256).hexdigest()[:32]
        # Admit (the minute window; nothing is blocked or limited), then the pool.
        now = time.time()
        while window and window[0] <= now - 60:
            window.popleft()
        window.append(now)
        pool = pools.get(f"{found[2]}:{size}:{model}")
        if pool is None:
            path = Path(db_dir) / f"{found[2]}.png"
            path.write_bytes(b"x" * 1000)
            pool = pools[f"{found[2]}:{size}:{model}"] = [(found[2], 1000, str(path))]
        data = []
        for sha, file_size, path_name in pool[:n]:
            if os.stat(path_name).st_size != file_size:
                raise web.HTTPInternalServerError()
            signed = urls.get(sha)
            if signed is None or signed[0] < now:  # a signed URL is reused for 60 s
                expires = int(now) + 3600
                signature = hmac.new(key, f"{sha}.{expires}".encode(),
                                     hashlib.sha256).hexdigest()
                signed = urls[sha] = (now + 60, (
                    f'{{"url":"http://{request.host}/v1/images/files/{sha}.png?'
                    f'expires={expires}&signature={signature}"}}'))
            data.append(signed[1])
        period = time.strftime("%Y-%m-%d", time.gmtime(now))
        counts[(member, period)] = counts.get((member, period), 0) + 1
        child(lookups, "hit").inc()
        child(from_cache, size).inc(n)
        saved.inc(0.018 * n)
        child(budget, member).set(0.0)
        response = web.Response(
            body=b'{"created":%d,"data":[%s]}' % (int(now), ",".join(data).encode()),
            content_type="application/json",
            headers={"X-Cache": "HIT", "x-request-id": request_id})
        # Finish: metrics, the audit row (committed before the answer), abuse, the log.
        in_flight.dec()
        elapsed = time.perf_counter() - started
        child(requests, "/v1/images/variations", "2xx", "").inc()
        child(seconds, "/v1/images/variations").observe(elapsed)
        child(overhead, "/v1/images/variations").observe(elapsed)
        child(user_requests, member).inc()
        latency_ms = round(elapsed * 1000, 3)
        loop = asyncio.get_running_loop()
        if not audit_rows:
            loop.call_soon(commit)
        audit_rows.append((request_id, time.time(), request.path[:200], request.remote,
                           member, None, user, user_hash, found[1], n, size, model, None,
                           "HIT", 0, 0.0, 200, None, latency_ms, len(image)))
        waiting.append(done := loop.create_future())
        done.add_done_callback(lambda _: audit_events.inc())
        end_users[user or ""] = now  # distinct end users per member
        if len(end_users) > 10_000:
            del end_users[next(iter(end_users))]
        log.info("request", request_id=request_id, method=request.method,
                 path=request.path[:200], status=200, member=member, auth_error=None,
                 user=user, client=request.remote, image_sha256=found[1], model=model,
                 latency_ms=latency_ms, backend=None, cache="HIT", n=n, size=size,
                 images_charged=0, error_code=None, bytes_in=len(image),
                 bytes_out=response.content_length)
        await done
        return response

    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_post("/v1/images/variations", answer)
    return app


SIZES = frozenset({"256x256", "512x512", "1024x1024"})
AUDIT_COLUMNS = ("request_id", "ts", "route", "client", "member", "auth_error", "end_user",
                 "end_user_hash", "image_sha256", "n", "size", "model", "backend", "cache",
                 "images_charged", "cost_usd", "status", "error_code", "latency_ms",
                 "upload_bytes")


def _open(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def main() -> None:
    port, body, mode = int(sys.argv[1]), Path(sys.argv[2]).read_bytes(), sys.argv[3:]

    async def answer(request: web.Request) -> web.Response:
        upload = await request.read()
        if "sha256" in mode:
            hashlib.sha256(upload).hexdigest()
        return web.Response(body=body, content_type="application/json")

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    with tempfile.TemporaryDirectory() as db_dir:
        if "duties" in mode:
            app = duties(body, db_dir)
        else:
            app = web.Application(client_max_size=8 * 1024 * 1024)
            app.router.add_post("/{tail:.*}", answer)
        app.router.add_get("/healthz", healthz)
        web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
