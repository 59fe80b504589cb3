"""The least an aiohttp process can do per cache hit: baselines for ``make bench``.

``python floor_server.py PORT BODY_FILE [sha256 | duties]`` answers ``POST`` with the
bytes of ``BODY_FILE`` and ``GET /healthz`` with 200. Modes:

- (none): read the whole upload and answer. No parsing, no auth, no state: what is left
  of the gateway's cost per hit once everything it must do is removed.
- ``sha256``: also hash the upload.
- ``duties``: a lean sketch of what issue 3 asks of every cache hit, nothing else: frame
  the multipart body, find the upload among remembered ones by an exact comparison (for
  its SHA-256), sign a URL, commit an audit row and a ledger count to SQLite before
  answering (one transaction per loop turn), update four metrics and write one JSON
  log line. No auth, quotas, validation or error handling: a ceiling, not a gateway.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram


def duties(body: bytes, db_dir: str) -> web.Application:
    db = sqlite3.connect(f"{db_dir}/floor.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE audit (id INTEGER PRIMARY KEY, ts REAL, request_id TEXT, "
               "member TEXT, end_user TEXT, client TEXT, image_sha256 TEXT, n INTEGER, "
               "size TEXT, cache TEXT, status INTEGER, latency_ms REAL)")
    db.execute("CREATE INDEX audit_member ON audit (member, id)")
    db.execute("CREATE INDEX audit_end_user ON audit (end_user, id)")
    db.execute("CREATE TABLE ledger (member TEXT PRIMARY KEY, requests INTEGER)")
    registry = CollectorRegistry()
    requests = Counter("requests", "", ["route", "code"], registry=registry)
    seconds = Histogram("seconds", "", ["route"], registry=registry)
    sizes = Histogram("upload_bytes", "", registry=registry)
    hits = Counter("hits", "", ["user"], registry=registry)
    known: dict[tuple[int, bytes], tuple[bytes, str]] = {}
    rows: list[tuple[object, ...]] = []
    waiting: list[asyncio.Future[None]] = []
    key = b"k" * 32

    def commit() -> None:
        batch, done = rows[:], waiting[:]
        rows.clear()
        waiting.clear()
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT INTO audit VALUES (NULL,?,?,?,?,?,?,?,?,?,?,?)", batch)
            db.execute("INSERT INTO ledger VALUES ('alice', ?) ON CONFLICT(member) DO "
                       "UPDATE SET requests = requests + excluded.requests", (len(batch),))
        for future in done:
            future.set_result(None)

    async def answer(request: web.Request) -> web.Response:
        started = time.perf_counter()
        upload = await request.read()
        boundary = request.headers["Content-Type"].partition("boundary=")[2].encode()
        delimiter = b"\r\n--" + boundary
        fields, pos = {}, len(boundary) + 4
        while (end := upload.find(delimiter, pos)) > 0:
            head = upload.find(b"\r\n\r\n", pos)
            name = upload[pos:head].partition(b'name="')[2].partition(b'"')[0]
            fields[name] = upload[head + 4:end]
            pos = end + len(delimiter) + 2
        image = fields[b"image"]
        found = known.get((len(image), image[-64:]))
        if found is None or found[0] != image:
            found = known[(len(image), image[-64:])] = (image, hashlib.sha256(image).hexdigest())
        expires = int(time.time()) + 3600
        hmac.new(key, b"image-id.%d" % expires, hashlib.sha256).hexdigest()
        request_id = "req_" + secrets.token_hex(12)
        latency = time.perf_counter() - started
        loop = asyncio.get_running_loop()
        if not rows:
            loop.call_soon(commit)
        rows.append((time.time(), request_id, "alice", fields.get(b"user", b"").decode(),
                     request.remote, found[1], int(fields.get(b"n", b"1")), "512x512",
                     "HIT", 200, latency * 1000))
        waiting.append(done := loop.create_future())
        requests.labels("/v1/images/variations", "2xx").inc()
        seconds.labels("/v1/images/variations").observe(latency)
        sizes.observe(len(image))
        hits.labels("alice").inc()
        await done
        sys.stdout.write(json.dumps({
            "event": "request", "level": "info", "timestamp": time.time(),
            "request_id": request_id, "member": "alice", "image_sha256": found[1],
            "status": 200, "cache": "HIT", "latency_ms": latency * 1000}) + "\n")
        return web.Response(body=body, content_type="application/json")

    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_post("/{tail:.*}", answer)
    return app


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
