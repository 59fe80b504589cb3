"""The audit trail (issue 3): every request, refused ones too; HMAC'd end users."""

from __future__ import annotations

import hashlib
import sqlite3
import time
import types
from pathlib import Path
from typing import Any

import pytest
import structlog
from instrumented_backend import Start, register, variation_form, vary
from support import ADMIN_TOKEN, TOKENS, eventually, eventually_sync, png_bytes

from gateway.audit import AuditRecord
from gateway.audit.sqlite import AuditLog
from gateway.keys import AUDIT

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def instrumented(monkeypatch: pytest.MonkeyPatch, gateway_client: Any) -> Start:
    return register(monkeypatch, gateway_client)


def row(client: Any, request_id: str) -> dict[str, Any]:
    (found,) = [r for r in client.app[AUDIT].query(limit=1000)
                if r["request_id"] == request_id]
    return found


async def test_every_request_is_audited_also_refused_ones(instrumented: Start) -> None:
    client, backend = await instrumented(
        quota_defaults={"images_per_day": 2},
        pricing={"256x256": 0.016, "512x512": 0.018, "1024x1024": 0.02})
    image = png_bytes(seed=1)
    image_sha = hashlib.sha256(image).hexdigest()

    ok = await vary(client, image, n=2, user="artist@studio")
    r = row(client, ok.headers["x-request-id"])
    assert r["member"] == "alice" and r["auth_error"] is None
    assert r["end_user"] == "artist@studio"
    assert r["end_user_hash"] == backend.requests[0].user
    assert r["client"] == "127.0.0.1" and r["route"] == "/v1/images/variations"
    assert r["image_sha256"] == image_sha
    assert (r["n"], r["size"], r["model"], r["backend"]) == (2, "256x256", "dall-e-2", "inst")
    assert (r["cache"], r["images_charged"], r["status"], r["error_code"]) == (
        "MISS", 2, 200, None)
    assert r["cost_usd"] == pytest.approx(0.032)
    assert r["latency_ms"] > 0 and abs(r["ts"] - time.time()) < 60

    over = await vary(client, png_bytes(seed=2), user="artist@studio")
    r = row(client, over.headers["x-request-id"])
    assert (r["status"], r["error_code"], r["images_charged"]) == (429, "quota_exceeded", 0)
    assert r["image_sha256"] == hashlib.sha256(png_bytes(seed=2)).hexdigest()

    bad = await vary(client, image, size="300x300")
    r = row(client, bad.headers["x-request-id"])
    assert (r["member"], r["status"], r["error_code"]) == ("alice", 400, "invalid_value")

    async with client.post("/v1/images/variations", data=variation_form(image)) as resp:
        r = row(client, resp.headers["x-request-id"])
    assert (r["member"], r["auth_error"], r["status"]) == (None, "missing_token", 401)
    async with client.post("/v1/images/variations", data=variation_form(image),
                           headers={"Authorization": "Bearer vg-wrong"}) as resp:
        r = row(client, resp.headers["x-request-id"])
    assert (r["member"], r["auth_error"], r["status"], r["error_code"]) == (
        None, "bad_token", 401, "invalid_api_key")

    async with client.post("/admin/users/alice/block", headers=ADMIN) as resp:
        assert resp.status == 200
    blocked = await vary(client, image, user="artist@studio")
    r = row(client, blocked.headers["x-request-id"])
    assert (r["member"], r["status"], r["error_code"]) == ("alice", 403, "user_blocked")
    # Admission comes before the body is read (issue 19, item 2): a blocked member's
    # upload is never read, so the record names no image or end user.
    assert r["image_sha256"] is None and r["end_user"] is None
    assert r["upload_bytes"] == 0
    assert len(backend.calls) == 1


async def test_upstream_user_is_an_hmac_of_member_and_user(instrumented: Start) -> None:
    """Upstream sees neither the member nor the raw user; the audit keeps the mapping."""
    client, backend = await instrumented()
    await vary(client, png_bytes(seed=1), user="kim")
    await vary(client, png_bytes(seed=2), user="kim", token_user="bob")
    await vary(client, png_bytes(seed=3), user="lee")
    await vary(client, png_bytes(seed=4), user="kim")
    await vary(client, png_bytes(seed=5))
    sent = [req.user for req in backend.requests]
    assert sent[4] is None
    assert sent[0] == sent[3]  # stable: the provider can correlate one end user
    assert len({sent[0], sent[1], sent[2]}) == 3  # per member and per user
    for value in sent[:4]:
        assert value is not None and value.startswith("vgu-")
        assert "kim" not in value and "alice" not in value and "bob" not in value
        assert TOKENS["alice"] not in value
    # The audit maps a value the provider reports back to member and end user.
    rows = client.app[AUDIT].query(limit=100)
    mapping = {(r["member"], r["end_user"]) for r in rows if r["end_user_hash"] == sent[1]}
    assert mapping == {("bob", "kim")}
    # The same across a restart (the key derives from the persisted signing key).
    await client.close()
    again, backend2 = await instrumented()
    await vary(again, png_bytes(seed=6), user="kim")
    assert backend2.requests[0].user == sent[0]


async def test_audit_is_also_a_structlog_event(instrumented: Start) -> None:
    client, _ = await instrumented(audit={"stdout": True})
    with structlog.testing.capture_logs() as logs:
        a = await vary(client, png_bytes(), user="kim")
    events = [e for e in logs if e["event"] == "audit"]
    assert len(events) == 1
    e = events[0]
    assert e["request_id"] == a.headers["x-request-id"]
    assert (e["member"], e["end_user"], e["status"], e["images_charged"]) == (
        "alice", "kim", 200, 1)


async def test_retention_days(instrumented: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records older than retention_days go at startup and while the gateway runs, a
    batch at a time (one DELETE of an hour's rows held the event loop for seconds)."""
    monkeypatch.setattr("gateway.audit.PURGE_BATCH", 3)
    monkeypatch.setattr("gateway.audit.PURGE_EVERY_SECONDS", 0.01)
    client, _ = await instrumented(audit={"retention_days": 30})
    audit = client.app[AUDIT]
    now = time.time()
    for i in range(7):  # three batches' worth
        await audit.write(AuditRecord(f"req_old{i}", now - 31 * 86400, "/v1/usage", status=200))
    await audit.write(AuditRecord("req_recent", now - 29 * 86400, "/v1/usage", status=200))
    await client.close()  # one process per state file: stop, then start again

    def ids() -> set[str]:
        return {r["request_id"] for r in restarted.app[AUDIT].query(limit=100)}

    restarted, _ = await instrumented(audit={"retention_days": 30})
    await eventually(lambda: not any(i.startswith("req_old") for i in ids()), "old rows purged")
    assert "req_recent" in ids()

    # Two days later, without a restart: the background task purges.
    later = types.SimpleNamespace(time=lambda: time.time() + 2 * 86400)
    monkeypatch.setattr("gateway.audit.sqlite.time", later)
    await eventually(lambda: "req_recent" not in ids(), "the recent row purged two days on")


def test_member_and_end_user_queries_walk_an_index(tmp_path: Path) -> None:
    """Newest-first pages by member or end user read from an index in id order: with
    (member, ts) SQLite sorted all of a busy member's rows first (0.5 s per million)."""
    AuditLog(tmp_path / "audit.db", retention_days=90).close()  # the schema it makes
    db = sqlite3.connect(tmp_path / "audit.db")
    try:
        base = "SELECT id FROM audit WHERE {} = ? AND ts >= ? ORDER BY id DESC LIMIT 100"
        # action and target too (/admin/audit?target=bob: review, it scanned the table).
        for column in ("member", "end_user", "end_user_hash", "action", "target"):
            plan = " ".join(str(row[-1]) for row in db.execute(
                "EXPLAIN QUERY PLAN " + base.format(column), ("x", 0)))
            assert f"INDEX audit_{column}_id" in plan and "TEMP B-TREE" not in plan, plan
    finally:
        db.close()


async def test_refused_form_keeps_its_raw_fields(gateway_client) -> None:  # type: ignore[no-untyped-def]
    """A request refused while its form is validated is still audited with the ``user``
    (and size, model) it sent: that is what abuse monitoring needs most."""
    import aiohttp
    from support import auth

    client = await gateway_client()
    form = aiohttp.FormData()
    form.add_field("image", png_bytes(64), filename="a.png")
    form.add_field("size", "300x300")
    form.add_field("user", "probe-user-7")
    resp = await client.post("/v1/images/variations", data=form, headers=auth())
    assert resp.status == 400
    rows = client.app[AUDIT].query(end_user="probe-user-7")
    assert len(rows) == 1
    assert (rows[0]["status"], rows[0]["size"], rows[0]["error_code"]) == (
        400, "300x300", "invalid_value")
    assert rows[0]["member"] == "alice"
    # ... and the image it sent, so "who sent this image" finds refused attempts too
    assert rows[0]["image_sha256"] == hashlib.sha256(png_bytes(64)).hexdigest()
    assert rows[0]["upload_bytes"] == len(png_bytes(64))


CONTROLS = "\x1b]0;OWNED\x07\x1b[2J\x9b\u202e\r\n"


def _has_control(text: str) -> bool:
    return any(c in text for c in "\x1b\x07\x9b\u202e\r\n")


@pytest.mark.parametrize("field", ["user", "model", "size"])
async def test_refused_values_are_stored_with_control_characters_escaped(
        gateway_client, field: str) -> None:  # type: ignore[no-untyped-def]
    """Issue 19, item 12: a rejected ``user``, ``model`` or ``size`` reached the audit
    (and an admin's ``sqlite3`` terminal) raw."""
    import aiohttp
    from support import auth

    client = await gateway_client(audit={"stdout": True})
    form = aiohttp.FormData()
    form.add_field("image", png_bytes(64), filename="a.png")
    form.add_field(field, f"probe{CONTROLS}")
    with structlog.testing.capture_logs() as logs:
        resp = await client.post("/v1/images/variations", data=form, headers=auth())
    assert resp.status == 400
    stored = row(client, resp.headers["x-request-id"])
    value = stored[{"user": "end_user"}.get(field, field)]
    assert value == "probe\\x1b]0;OWNED\\x07\\x1b[2J\\x9b\\u202e\\r\\n"
    (shipped,) = [e for e in logs if e["event"] == "audit"]
    assert not [v for v in shipped.values() if isinstance(v, str) and _has_control(v)], shipped


async def test_a_404_path_is_stored_with_control_characters_escaped(gateway_client
                                                                    ) -> None:  # type: ignore[no-untyped-def]
    client = await gateway_client()
    resp = await client.get("/admin/x%1B%5D0;OWNED%07%1B%5B2J", headers=ADMIN)
    assert resp.status == 404
    assert "\x1b" not in await resp.text()
    stored = row(client, resp.headers["x-request-id"])
    assert stored["route"] == "/admin/x\\x1b]0;OWNED\\x07\\x1b[2J"


def test_console_log_lines_escape_what_a_client_sent(gateway_process) -> None:  # type: ignore[no-untyped-def]
    """An unauthenticated path reached the operator's terminal raw with console logs:
    ``/x\\x1b]0;OWNED\\x07\\x1b[2J`` retitled and cleared it."""
    import urllib.error
    import urllib.request

    g = gateway_process(logging={"format": "console"})
    for path in ("/x%1B%5D0;OWNED%07%1B%5B2J", "/v1/usage%1B%5B2J%C2%9B%E2%80%AE"):
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(g.url + path, timeout=10)
    eventually_sync(lambda: "/v1/usage" in g.log(), "the second path's log line")
    log = g.log()
    assert "OWNED" in log and "/v1/usage" in log  # the lines were written...
    for raw in ("\x1b]0;OWNED", "\x07", "\x1b[2J", "\x9b", "\u202e"):
        assert raw not in log, raw  # ...but nothing a terminal would act on
    assert "/x\\x1b]0;OWNED\\x07\\x1b[2J" in log
