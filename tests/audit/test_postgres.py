"""``audit.kind: postgres`` end to end (issue 21): real gateway processes, a real
PostgreSQL cluster (tests/postgres_server.py), outages and a kill -9."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from postgres_server import PostgresServer
from support import (
    ADMIN_TOKEN,
    TOKENS,
    GatewayProcess,
    base_config,
    eventually_sync,
    multipart_body,
    png_bytes,
    start_gateway,
)

from gateway.config import build_config
from gateway.config.display import dump_config

BOUNDARY = "vgpgtest"


def vary(url: str, user: str = "alice", seed: int = 0) -> str:
    """One answered variations request: its x-request-id."""
    body = multipart_body({"n": "1", "size": "256x256"}, png_bytes(32, seed=seed), BOUNDARY)
    req = urllib.request.Request(url + "/v1/images/variations", data=body, headers={
        "Authorization": f"Bearer {TOKENS[user]}",
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200
        return str(r.headers["x-request-id"])


def admin(url: str, path: str) -> tuple[int, Any]:
    req = urllib.request.Request(url + path,
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def shipped(pg: PostgresServer, db: str) -> tuple[int, set[str]]:
    """Rows in PostgreSQL for variations requests, and their distinct request ids."""
    import asyncpg

    try:
        rows = pg.sql("SELECT request_id FROM audit WHERE route = '/v1/images/variations'",
                      db)
    except asyncpg.UndefinedTableError:  # the gateway has not connected yet
        return 0, set()
    return len(rows), {str(r[0]) for r in rows}


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    yield started
    for g in started:
        g.stop()


def replica(tmp: Path, dsn: str, started: list[GatewayProcess]) -> GatewayProcess:
    """A gateway with state, cache and outbox of its own in ``tmp``."""
    raw = base_config(tmp, audit={"kind": "postgres", "dsn": dsn,
                                  "path": str(tmp / "outbox.sqlite3")})
    g = start_gateway(raw, tmp)
    started.append(g)
    return g


def test_two_replicas_share_one_audit_trail(postgres_server: PostgresServer, tmp_path: Path,
                                            replicas: list[GatewayProcess]) -> None:
    dsn = postgres_server.database("two_replicas")
    a = replica(tmp_path / "a", dsn, replicas)
    b = replica(tmp_path / "b", dsn, replicas)
    ids = {vary(a.url, seed=1), vary(b.url, "bob", seed=2), vary(b.url, seed=3)}
    for g in (a, b):
        def found(g: GatewayProcess = g) -> bool:
            status, body = admin(g.url, "/admin/audit?limit=100")
            return status == 200 and ids <= {r["request_id"] for r in body["data"]}

        eventually_sync(found, f"{g.url}/admin/audit shows both replicas' records", 20)
    status, body = admin(a.url, "/admin/audit?user=bob")
    assert status == 200 and [r["member"] for r in body["data"]] == ["bob"]
    status, usage = admin(b.url, "/admin/usage")
    assert usage["users"]["alice"]["requests_today"] == 2  # one on each replica
    assert postgres_server.sql("SELECT component, version FROM schema_version",
                               "two_replicas") == [("audit", 1)]


def test_postgres_stopped_during_a_burst_loses_nothing_and_doubles_nothing(
        postgres_server: PostgresServer, tmp_path: Path,
        replicas: list[GatewayProcess]) -> None:
    dsn = postgres_server.database("outage")
    g = replica(tmp_path / "g", dsn, replicas)
    done: list[str] = []
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(vary, g.url, "alice", i % 5) for i in range(50)]
            eventually_sync(lambda: sum(f.done() for f in futures) >= 15, "a quarter sent")
            postgres_server.stop()  # mid-burst: the rest is answered meanwhile
            futures += [pool.submit(vary, g.url, "bob", i % 5) for i in range(10)]
            done = [f.result() for f in futures]
        status, ready = _get(g.url + "/readyz")
        assert status == 200, ready  # the outbox grows; the gateway stays ready
        assert ready["checks"]["audit"]["kind"] == "postgres"
        assert ready["checks"]["audit"]["outbox_records"] >= 10
        eventually_sync(lambda: _gauge(g.url, "audit_outbox_records") > 0,
                        "the outbox gauge shows the backlog", 20)
        status, body = admin(g.url, "/admin/audit")
        assert status == 503 and body["error"]["code"] == "audit_unavailable"
        assert "postgres@" not in json.dumps(body)
    finally:
        if postgres_server.proc is None:
            postgres_server.start()
    assert len(done) == 60
    eventually_sync(lambda: shipped(postgres_server, "outage")[1] == set(done),
                    lambda: f"every answer in PostgreSQL ({shipped(postgres_server, 'outage')[0]})",
                    60)
    assert shipped(postgres_server, "outage") == (60, set(done))  # once each, none twice
    eventually_sync(lambda: _gauge(g.url, "audit_outbox_records") == 0, "outbox empty", 20)


def test_kill_9_with_records_in_the_outbox_ships_them_after_restart(
        postgres_server: PostgresServer, tmp_path: Path,
        replicas: list[GatewayProcess]) -> None:
    dsn = postgres_server.database("killed")
    g = replica(tmp_path / "k", dsn, replicas)
    vary(g.url, seed=1)
    eventually_sync(lambda: shipped(postgres_server, "killed")[0] == 1, "first shipped", 20)
    postgres_server.stop()
    try:
        ids = {vary(g.url, seed=i) for i in range(8)}
        g.stop(signal.SIGKILL)
        replicas.remove(g)
        replica(tmp_path / "k", dsn, replicas)  # the same outbox file
    finally:
        postgres_server.start()
    eventually_sync(lambda: ids <= shipped(postgres_server, "killed")[1],
                    "the killed replica's outbox shipped after its restart", 60)
    count, distinct = shipped(postgres_server, "killed")
    assert count == len(distinct) == 9


def test_check_config_masks_the_dsn_password(tmp_path: Path) -> None:
    for dsn, secret in (("postgresql://audit:s3cr%40t@db:5432/vg", "s3cr"),
                        ("host=db user=audit password='s3 cret' dbname=vg", "s3 cret"),
                        ("postgresql://db/vg?user=audit&password=s3cret", "s3cret")):
        cfg = build_config(base_config(tmp_path, audit={"kind": "postgres", "dsn": dsn}))
        shown = dump_config(cfg)
        assert secret not in shown and "***" in shown, shown
        assert secret not in repr(cfg.audit)


def test_kind_postgres_needs_a_dsn(tmp_path: Path) -> None:
    from gateway.config import ConfigError

    with pytest.raises(ConfigError, match=r"audit\.dsn"):
        build_config(base_config(tmp_path, audit={"kind": "postgres"}))


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _gauge(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(f"variations_gateway_{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exposed")
