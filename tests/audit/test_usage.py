"""``GET /admin/usage.csv`` (issue 21): one row per member for a month, from the audit
trail, matching the quota ledger; with the SQLite trail and with PostgreSQL."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from typing import Any

import pytest
from instrumented_backend import Start, register, vary
from postgres_server import PostgresServer
from redis_server import RedisServer
from support import ADMIN_TOKEN, TOKENS, auth, eventually, png_bytes, sha

from gateway.keys import AUDIT, QUOTA

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PRICES = {"256x256": 0.016, "512x512": 0.018, "1024x1024": 0.02}


@pytest.fixture
def instrumented(monkeypatch: pytest.MonkeyPatch, gateway_client: Any) -> Start:
    return register(monkeypatch, gateway_client)


@pytest.fixture(params=["sqlite", "postgres"])
def audit_section(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "sqlite":
        return {}
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return {"kind": "postgres", "dsn": server.database("usage_csv")}


async def _mixed_traffic(client: Any) -> None:
    """Generated, cached, partly cached, bypassed and refused requests of two members."""
    a, b = png_bytes(seed=11), png_bytes(seed=12)
    assert (await vary(client, a, n=2)).status == 200  # MISS: 2 images
    assert (await vary(client, a, n=2)).status == 200  # HIT: a request, no images
    assert (await vary(client, a, n=3)).status == 200  # PARTIAL: 1 image
    assert (await vary(client, a, headers={"Cache-Control": "no-store"})).status == 200
    assert (await vary(client, a, size="300x300")).status == 400
    assert (await vary(client, b, size="512x512", token_user="bob")).status == 200
    assert (await vary(client, png_bytes(seed=13), token_user="bob")).status == 429
    async with client.post("/v1/images/variations", headers={"Authorization": "Bearer x"},
                           data={"n": "1"}) as r:
        assert r.status == 401


async def _csv(client: Any, month: str) -> dict[str, dict[str, str]]:
    async with client.get("/admin/usage.csv", params={"month": month}, headers=ADMIN) as r:
        assert r.status == 200, await r.text()
        assert r.content_type == "text/csv"
        rows = list(csv.DictReader(io.StringIO(await r.text())))
    return {row["member"]: row for row in rows}


async def test_usage_csv_for_this_month_matches_the_ledger(
        instrumented: Start, audit_section: dict[str, Any]) -> None:
    client, _ = await instrumented(
        pricing=PRICES, audit=audit_section,
        users={"bob": {"token_sha256": sha(TOKENS["bob"]), "quota": {"images_per_day": 1}}})
    await _mixed_traffic(client)
    audit = client.app[AUDIT]
    await eventually(lambda: audit.outbox_stats().records == 0, "the outbox shipped")
    month = datetime.now(UTC).strftime("%Y-%m")
    rows = await _csv(client, month)
    ledger = await client.app[QUOTA].all_usage()
    assert set(rows) == {"alice", "bob"}
    for member, row in rows.items():
        expected = ledger[member]
        assert row["month"] == month
        assert int(row["images"]) == expected["images_this_month"], member
        assert float(row["spend_usd"]) == pytest.approx(expected["spend_usd_this_month"])
        assert int(row["requests"]) == expected["requests_today"], member
        assert int(row["cache_hits"]) == expected["cache_hits_today"], member
    assert (rows["alice"]["images"], rows["alice"]["requests"],
            rows["alice"]["cache_hits"]) == ("4", "4", "1")
    assert (rows["bob"]["images"], rows["bob"]["requests"]) == ("1", "1")
    # /admin/usage (from PostgreSQL with kind postgres) says the same as the ledger.
    async with client.get("/admin/usage", headers=ADMIN) as r:
        body = await r.json()
    users = body["users"]
    assert body["source"] == ("audit" if audit_section else "ledger")
    for member in ("alice", "bob"):
        shown = {k: v for k, v in users[member].items() if k != "blocked"}
        assert shown == pytest.approx(ledger[member]), member
    # Another month holds nothing: every configured member, zeros.
    empty = await _csv(client, "2001-02")
    assert {m: (r["images"], r["spend_usd"]) for m, r in empty.items()} == {
        "alice": ("0", "0.000000"), "bob": ("0", "0.000000")}


async def test_usage_csv_refuses_a_per_replica_trail_behind_a_shared_ledger(
        gateway_client: Any, redis_server: RedisServer) -> None:
    """state.kind redis with audit.kind sqlite: replicas behind a load balancer, each
    with its own audit file; a CSV from one would be silently partial."""
    client = await gateway_client(state={"kind": "redis", "redis_url": redis_server.url})
    async with client.get("/admin/usage.csv", headers=ADMIN) as r:
        assert r.status == 409
        error = (await r.json())["error"]
    assert error["code"] == "audit_not_shared" and "audit.kind: postgres" in error["message"]
    async with client.get("/admin/usage", headers=ADMIN) as r:  # the ledger: the team's
        assert r.status == 200 and (await r.json())["source"] == "ledger"


@pytest.mark.parametrize("month", ["2024-13", "2024-1", "24-01", "2024-01-01", "x"])
async def test_a_bad_month_is_a_400_naming_month(gateway_client: Any, month: str) -> None:
    client = await gateway_client()
    async with client.get("/admin/usage.csv", params={"month": month}, headers=ADMIN) as r:
        assert r.status == 400
        error = (await r.json())["error"]
    assert error["param"] == "month" and error["type"] == "invalid_request_error"


async def test_usage_csv_is_for_the_admin_only(gateway_client: Any) -> None:
    client = await gateway_client()
    async with client.get("/admin/usage.csv", headers=auth()) as r:
        assert r.status == 403
    async with client.get("/admin/usage.csv") as r:
        assert r.status == 401


def test_usage_cli_prints_the_month_from_a_running_gateway(
        gateway_process: Any, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``variations-gateway usage``: the admin token from the environment, a table or
    the CSV as is; a bad month is the gateway's 400 message, exit 1."""
    import urllib.request

    from support import multipart_body

    from gateway.cli import main

    g = gateway_process()
    body = multipart_body({"n": "2", "size": "256x256"}, png_bytes(32), "b")
    req = urllib.request.Request(g.url + "/v1/images/variations", data=body, headers={
        **auth(), "Content-Type": "multipart/form-data; boundary=b"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200
    month = datetime.now(UTC).strftime("%Y-%m")
    monkeypatch.delenv("VARIATIONS_GATEWAY_ADMIN_TOKEN", raising=False)
    assert main(["usage", "--url", g.url]) == 2  # no token: says which variable
    assert "VARIATIONS_GATEWAY_ADMIN_TOKEN" in capsys.readouterr().err
    monkeypatch.setenv("VARIATIONS_GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    assert main(["usage", "--month", month, "--url", g.url, "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["member"]: (r["images"], r["requests"]) for r in rows} == {
        "alice": ("2", "1"), "bob": ("0", "0")}
    assert main(["usage", "--month", month, "--url", g.url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["member", "month", "images", "requests", "cache_hits",
                                "spend_usd"]
    assert lines[-1].split()[:4] == ["total", month, "2", "1"]
    assert main(["usage", "--month", "2024-13", "--url", g.url]) == 1
    assert "Invalid 'month'" in capsys.readouterr().err


async def test_the_sqlite_trail_is_read_from_any_path_and_a_missing_file_is_a_503(
        tmp_path: Any) -> None:
    """Review: the read-only connection was built as "file:{path}?mode=ro", so a "?", "#"
    or "%" in the path read another file, and an unreadable file was a 500."""
    import time

    from gateway.audit import AuditRecord
    from gateway.audit.sqlite import AuditLog
    from gateway.errors import StorageUnavailable

    folder = tmp_path / "team?a#b%20c"
    folder.mkdir()
    trail = AuditLog(folder / "audit.sqlite3", 90)
    try:
        now = time.time()
        await trail.write(AuditRecord("req_1", now, "/v1/images/variations",
                                      member="alice", status=200, images_charged=2))
        usage = await trail.member_usage(now - 60, now + 60)
        assert usage["alice"].images == 2
        (folder / "audit.sqlite3").unlink()
        with pytest.raises(StorageUnavailable):
            await trail.member_usage(now - 60, now + 60)
    finally:
        trail.close()
