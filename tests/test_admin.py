"""The admin API (issue 3): admin token only, blocks that persist, the audit query."""

from __future__ import annotations

import io
from typing import Any

import pytest
from instrumented_backend import Start, register, usage, vary
from PIL import Image
from support import ADMIN_TOKEN, auth, png_bytes

from gateway.keys import AUDIT

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ROUTES = [("GET", "/admin/usage"), ("GET", "/admin/audit"),
          ("POST", "/admin/users/bob/block"), ("POST", "/admin/users/bob/unblock")]


@pytest.fixture
def instrumented(monkeypatch: pytest.MonkeyPatch, gateway_client: Any) -> Start:
    return register(monkeypatch, gateway_client)


def not_square() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 32)).save(buf, "PNG")
    return buf.getvalue()


async def admin_get(client: Any, path: str, **params: Any) -> dict[str, Any]:
    async with client.get(path, headers=ADMIN, params=params) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_member_token_gets_403_everywhere(instrumented: Start) -> None:
    """Acceptance: member token -> 403 on every admin route (401 without a token)."""
    client, _ = await instrumented()
    for method, path in ROUTES:
        async with client.request(method, path, headers=auth("alice")) as r:
            assert r.status == 403, path
            body = await r.json()
            assert body["error"]["code"] == "admin_only"
        async with client.request(method, path) as r:
            assert r.status == 401, path
    assert (await admin_get(client, "/admin/usage"))["users"]["bob"]["blocked"] is False
    async with client.get("/v1/usage", headers=ADMIN) as r:  # nor is admin a member
        assert r.status == 401
    # The audit says which member knocked (or that the token is nobody's).
    async with client.get("/admin/usage", headers=auth("bob")) as r:
        assert r.status == 403
        bob_id = r.headers["x-request-id"]
    async with client.get("/admin/usage", headers={"Authorization": "Bearer vg-nobody"}) as r:
        assert r.status == 403
        nobody_id = r.headers["x-request-id"]
    rows = {row["request_id"]: row for row in client.app[AUDIT].query(limit=50)}
    assert (rows[bob_id]["member"], rows[bob_id]["auth_error"]) == ("bob", None)
    assert (rows[nobody_id]["member"], rows[nobody_id]["auth_error"]) == (None, "bad_token")


async def test_block_and_unblock_persist(instrumented: Start) -> None:
    """Acceptance: block -> the member gets 403 user_blocked; other members unaffected;
    the block is kept in the state store across a restart."""
    client, backend = await instrumented()
    async with client.post("/admin/users/alice/block", headers=ADMIN) as r:
        assert r.status == 200 and (await r.json()) == {"user": "alice", "blocked": True}
    refused = await vary(client, png_bytes())
    assert refused.status == 403
    assert refused.body["error"]["code"] == "user_blocked"
    assert refused.headers["x-should-retry"] == "false"
    assert (await vary(client, png_bytes(), token_user="bob")).status == 200
    assert (await usage(client))["blocked"] is True
    assert (await admin_get(client, "/admin/usage"))["users"]["alice"]["blocked"] is True
    assert backend.calls == [1]

    await client.close()  # one process per state file: stop, then start again
    restarted, _ = await instrumented()
    assert (await vary(restarted, png_bytes(seed=1))).status == 403
    async with restarted.post("/admin/users/alice/unblock", headers=ADMIN) as r:
        assert r.status == 200
    assert (await vary(restarted, png_bytes(seed=1))).status == 200
    async with restarted.post("/admin/users/nobody/block", headers=ADMIN) as r:
        assert r.status == 404


async def test_audit_query_by_end_user(instrumented: Start) -> None:
    """Acceptance: audit query by end_user returns that user's requests (newest first),
    with member, time and paging filters."""
    client, backend = await instrumented()
    ids: dict[str, list[str]] = {"kim": [], "lee": []}
    for i, (member, end_user) in enumerate([("alice", "kim"), ("alice", "lee"),
                                            ("bob", "kim"), ("alice", "kim")]):
        a = await vary(client, png_bytes(seed=i), user=end_user, token_user=member)
        ids[end_user].append(a.headers["x-request-id"])
    await vary(client, not_square(), user="kim")  # refused: audited too

    kim = (await admin_get(client, "/admin/audit", end_user="kim"))["data"]
    assert [r["request_id"] for r in kim][1:] == ids["kim"][::-1]
    assert kim[0]["status"] == 400
    assert {r["end_user"] for r in kim} == {"kim"}
    alice_kim = (await admin_get(client, "/admin/audit", end_user="kim", user="alice"))["data"]
    assert [r["member"] for r in alice_kim] == ["alice"] * 3
    lee = (await admin_get(client, "/admin/audit", end_user="lee"))["data"]
    assert [r["request_id"] for r in lee] == ids["lee"]

    # A provider's abuse report names the HMAC it saw: it maps back the same way.
    reported = backend.requests[2].user
    assert reported is not None
    mapped = (await admin_get(client, "/admin/audit", end_user=reported))["data"]
    assert [(r["member"], r["end_user"]) for r in mapped] == [("bob", "kim")]

    # Pages, newest first, no overlap; time filters.
    seen: list[str] = []
    page = await admin_get(client, "/admin/audit", end_user="kim", limit=2)
    while True:
        seen += [r["request_id"] for r in page["data"]]
        if not page["has_more"]:
            break
        page = await admin_get(client, "/admin/audit", end_user="kim", limit=2,
                               before=page["next_before"])
    assert seen == [r["request_id"] for r in kim]
    exact = await admin_get(client, "/admin/audit", end_user="kim", limit=len(kim))
    assert exact["has_more"] is False and "next_before" not in exact
    first_ts = kim[-1]["ts"]
    since = (await admin_get(client, "/admin/audit", end_user="kim",
                             since=first_ts + 1e-6))["data"]
    assert [r["request_id"] for r in since] == [r["request_id"] for r in kim[:-1]]
    until = (await admin_get(client, "/admin/audit", end_user="kim",
                             until="2000-01-01T00:00:00Z"))["data"]
    assert until == []
    for bad in ({"limit": "0"}, {"before": "9" * 20}, {"limit": "-" + "9" * 20},
                {"since": "nan"}, {"until": "inf"}, {"since": "soon"}):  # one time rule
        async with client.get("/admin/audit", headers=ADMIN, params=bad) as r:
            assert r.status == 400, bad
            assert (await r.json())["error"]["param"] == next(iter(bad))


async def test_admin_usage_per_user(instrumented: Start) -> None:
    client, _ = await instrumented(
        pricing={"256x256": 0.016, "512x512": 0.018, "1024x1024": 0.02})
    image = png_bytes(seed=3)
    await vary(client, image, n=2)
    await vary(client, image, n=2)  # a HIT: a request and a cache hit, no images
    await vary(client, png_bytes(seed=4), size="1024x1024", token_user="bob")
    users = (await admin_get(client, "/admin/usage"))["users"]
    assert users["alice"] == {"images_today": 2, "images_this_month": 2, "requests_today": 2,
                              "cache_hits_today": 1, "spend_usd_this_month": 0.032,
                              "blocked": False}
    assert users["bob"]["images_today"] == 1
    assert users["bob"]["spend_usd_this_month"] == 0.02
