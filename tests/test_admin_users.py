"""``/admin/users`` (issue 21): members and tokens managed live, through the admin API."""

from __future__ import annotations

import io
import json
from typing import Any

import aiohttp
import pytest
import structlog
from support import ADMIN_TOKEN, auth, png_bytes, sha

from gateway.auth import EXPIRED_KEY, REVOKED_KEY
from gateway.keys import AUDIT, AUTH

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def call(client: Any, method: str, path: str, body: object = None,
               status: int = 200) -> dict[str, Any]:
    async with client.request(method, path, headers=ADMIN,
                              data=None if body is None else json.dumps(body)) as r:
        assert r.status == status, await r.text()
        return await r.json()


async def usage_status(client: Any, token: str) -> tuple[int, dict[str, Any]]:
    async with client.get("/v1/usage", headers=bearer(token)) as r:
        return r.status, await r.json()


async def test_create_use_rotate_revoke_remove(gateway_client: Any) -> None:
    client = await gateway_client()
    with structlog.testing.capture_logs() as logs:
        tokens = await _lifecycle(client)
    rows = client.app[AUDIT].query(limit=100)
    assert any(r["member"] == "carol" for r in rows)
    # Every admin action is in the audit: who (the admin token's id), what, on whom.
    actions = [(r["action"], r["target"]) for r in reversed(rows) if r["action"]]
    assert actions == [("user.create", "carol"), ("user.rotate", "carol"),
                       ("user.revoke", "carol"), ("user.revoke", "carol"),
                       ("user.remove", "carol"), ("user.show", "carol")]
    admins = {r["member"] for r in rows if r["action"]}
    assert len(admins) == 1 and admins.pop().startswith("admin:")
    # "Who revoked carol's tokens, and when" is one query, newest first.
    async with client.get("/admin/audit", headers=ADMIN,
                          params={"action": "user.revoke", "target": "carol"}) as r:
        revokes = (await r.json())["data"]
    assert [(x["action"], x["target"]) for x in revokes] == [("user.revoke", "carol")] * 2
    assert revokes[0]["id"] > revokes[1]["id"]
    async with client.get("/admin/audit", headers=ADMIN, params={"target": "dave"}) as r:
        assert (await r.json())["data"] == []
    # No token (nor its digest) in the audit or the logs.
    dumped = json.dumps(rows) + repr(logs)
    assert len(logs) > 10
    for secret in (*tokens, ADMIN_TOKEN):
        assert secret not in dumped and sha(secret) not in dumped


async def _lifecycle(client: Any) -> list[str]:
    """Create, use, rotate, revoke one token, revoke all, remove."""
    made = await call(client, "POST", "/admin/users",
                      {"name": "carol", "quota": {"images_per_day": 3}}, 201)
    token = made["token"]
    assert made["name"] == "carol" and made["source"] == "api" and token.startswith("vg-")
    # The token works for a variation, under the member's own quota.
    form = aiohttp.FormData({"n": "2", "size": "256x256", "response_format": "b64_json"})
    form.add_field("image", io.BytesIO(png_bytes()), filename="a.png")
    async with client.post("/v1/images/variations", headers=bearer(token), data=form) as r:
        assert r.status == 200, await r.text()
        assert r.headers["x-ratelimit-limit-images"] == "3"
    # Rotate: both tokens work until the old one is revoked.
    rotated = await call(client, "POST", "/admin/users/carol/tokens", None, 201)
    new = rotated["token"]
    assert rotated["revoked"] == 0 and len(rotated["tokens"]) == 2
    assert (await usage_status(client, token))[0] == 200
    assert (await usage_status(client, new))[0] == 200
    old_id = made["token_id"]
    await call(client, "DELETE", f"/admin/users/carol/tokens/{old_id}")
    status, body = await usage_status(client, token)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert body["error"]["message"] == REVOKED_KEY and "carol" not in json.dumps(body)
    assert (await usage_status(client, new))[0] == 200
    # Revoke all, then remove: the member is gone, their audit stays.
    assert (await call(client, "DELETE", "/admin/users/carol/tokens"))["revoked"] == 1
    assert (await usage_status(client, new))[1]["error"]["message"] == REVOKED_KEY
    await call(client, "DELETE", "/admin/users/carol")
    await call(client, "GET", "/admin/users/carol", status=404)
    return [token, new]


async def test_listing_shows_no_token_material(gateway_client: Any) -> None:
    client = await gateway_client()
    made = await call(client, "POST", "/admin/users",
                      {"name": "erin", "expires_at": "2999-01-01T00:00:00Z"}, 201)
    listed = await call(client, "GET", "/admin/users")
    text = json.dumps(listed)
    assert made["token"] not in text
    assert made["token"] not in json.dumps(await call(client, "GET", "/admin/users/erin"))
    by_name = {m["name"]: m for m in listed["data"]}
    assert {n: m["source"] for n, m in by_name.items()} == {
        "alice": "config", "bob": "config", "erin": "api"}
    erin = by_name["erin"]
    assert erin["expires_at"] == "2999-01-01T00:00:00Z" and len(erin["tokens"]) == 1
    assert set(erin["tokens"][0]) == {"id", "created_at", "expires_at", "expired"}
    for digest in (sha(made["token"]), sha("vg-test-alice-token")):
        assert digest not in text


async def test_config_members_answer_409_naming_the_config(gateway_client: Any) -> None:
    client = await gateway_client()
    for method, path, body in (
            ("POST", "/admin/users", {"name": "alice"}),
            ("PATCH", "/admin/users/alice", {"quota": {"images_per_day": 1}}),
            ("POST", "/admin/users/alice/tokens", None),
            ("DELETE", "/admin/users/alice/tokens", None),
            ("DELETE", "/admin/users/alice", None)):
        answer = await call(client, method, path, body, 409)
        assert answer["error"]["code"] == "managed_by_config", path
        assert "config" in answer["error"]["message"]
    assert (await usage_status(client, "vg-test-alice-token"))[0] == 200
    # Blocking works for both kinds of member.
    await call(client, "POST", "/admin/users", {"name": "frank"}, 201)
    for name in ("alice", "frank"):
        assert (await call(client, "POST", f"/admin/users/{name}/block"))["blocked"]
    assert (await call(client, "GET", "/admin/users/frank"))["blocked"] is True
    await call(client, "POST", "/admin/users/nobody/block", status=404)


async def test_an_expired_token_gets_401(gateway_client: Any) -> None:
    client = await gateway_client()
    now = client.app[AUTH].clock()
    made = await call(client, "POST", "/admin/users", {"name": "gina"}, 201)
    short = await call(client, "POST", "/admin/users/gina/tokens",
                       {"expires_at": now + 3600}, 201)
    assert (await usage_status(client, short["token"]))[0] == 200
    client.app[AUTH].clock = lambda: now + 7200  # the token's hour is over
    status, body = await usage_status(client, short["token"])
    assert status == 401 and body["error"]["message"] == EXPIRED_KEY
    assert body["error"]["code"] == "invalid_api_key"
    assert (await usage_status(client, made["token"]))[0] == 200  # no expiry of its own
    # The member's own expiry ends every token of theirs.
    await call(client, "PATCH", "/admin/users/gina", {"expires_at": now + 9000})
    client.app[AUTH].clock = lambda: now + 9001
    assert (await usage_status(client, made["token"]))[1]["error"]["message"] == EXPIRED_KEY


async def test_patch_changes_the_quota_live(gateway_client: Any) -> None:
    client = await gateway_client()
    made = await call(client, "POST", "/admin/users", {"name": "hal"}, 201)
    limits = (await usage_status(client, made["token"]))[1]["limits"]
    assert limits["images_per_day"]["limit"] == 1000  # quota_defaults
    changed = await call(client, "PATCH", "/admin/users/hal", {"quota": {"images_per_day": 7}})
    assert changed["quota"]["images_per_day"] == 7
    limits = (await usage_status(client, made["token"]))[1]["limits"]
    assert limits["images_per_day"]["limit"] == 7


@pytest.mark.parametrize(("method", "path", "body", "param", "status"), [
    ("POST", "/admin/users", {"name": "bad name"}, "name", 400),
    ("POST", "/admin/users", {"name": "admin"}, "name", 400),
    ("POST", "/admin/users", {}, "name", 400),
    ("POST", "/admin/users", {"name": "ok", "quota": {"image_per_day": 1}},
     "quota.image_per_day", 400),
    ("POST", "/admin/users", {"name": "ok", "expires_at": "soon"}, "expires_at", 400),
    ("POST", "/admin/users", {"name": "ok", "expires_at": 1}, "expires_at", 400),
    ("POST", "/admin/users", {"name": "ok", "colour": "red"}, "colour", 400),
    ("POST", "/admin/users", "not json", None, 400),
    ("PATCH", "/admin/users/nobody", {"quota": {}}, None, 404),
    ("POST", "/admin/users/nobody/tokens", None, None, 404),
    ("POST", "/admin/users/x/tokens", {"revoke_others": "yes"}, "revoke_others", 400),
])
async def test_bad_input_names_the_param(gateway_client: Any, method: str, path: str,
                                         body: object, param: str | None, status: int
                                         ) -> None:
    client = await gateway_client()
    data = body if isinstance(body, str) else json.dumps(body) if body is not None else None
    async with client.request(method, path, headers=ADMIN, data=data) as r:
        assert r.status == status, await r.text()
        error = (await r.json())["error"]
    assert error["param"] == param and error["message"]


async def test_members_get_403_on_the_member_routes(gateway_client: Any) -> None:
    client = await gateway_client()
    async with client.post("/admin/users", headers=auth("alice"),
                           data=json.dumps({"name": "x"})) as r:
        assert r.status == 403
    async with client.get("/admin/users") as r:
        assert r.status == 401


async def test_members_survive_a_restart(gateway_client: Any) -> None:
    client = await gateway_client()
    made = await call(client, "POST", "/admin/users", {"name": "ivy"}, 201)
    await client.close()
    restarted = await gateway_client()
    assert (await usage_status(restarted, made["token"]))[0] == 200


HUGE = "1" + "0" * 400  # a JSON integer float() cannot hold (OverflowError)


@pytest.mark.parametrize(("method", "path", "body", "param", "code"), [
    ("POST", "/admin/users", f'{{"name": "ok", "expires_at": {HUGE}}}', "expires_at",
     "invalid_value"),
    ("POST", "/admin/users/ok/tokens", f'{{"expires_at": {HUGE}}}', "expires_at",
     "invalid_value"),
    ("PATCH", "/admin/users/ok", f'{{"expires_at": -{HUGE}}}', "expires_at", "invalid_value"),
    ("POST", "/admin/users", "[" * 100_000, None, "invalid_json"),  # RecursionError
    ("PATCH", "/admin/users/ok", '{"quota": ' * 100_000, None, "invalid_json"),
    # json.loads takes NaN and Infinity, which are not JSON (RFC 8259 section 6).
    ("POST", "/admin/users", '{"name": "ok", "quota": {"budget_usd_per_month": NaN}}',
     "quota.budget_usd_per_month", "invalid_value"),
    ("POST", "/admin/users", '{"name": "ok", "quota": {"budget_usd_per_month": Infinity}}',
     "quota.budget_usd_per_month", "invalid_value"),
    ("PATCH", "/admin/users/ok", '{"quota": {"budget_usd_per_month": NaN}}',
     "quota.budget_usd_per_month", "invalid_value"),
    ("POST", "/admin/users", '{"name": "ok", "quota": {"images_per_day": NaN}}',
     "quota.images_per_day", "invalid_value"),
    ("POST", "/admin/users", '{"name": "ok", "expires_at": NaN}', "expires_at",
     "invalid_value"),
    ("POST", "/admin/users/ok/tokens", '{"expires_at": Infinity}', "expires_at",
     "invalid_value"),
])
async def test_hostile_input_is_a_400_not_a_500(gateway_client: Any, method: str, path: str,
                                                body: str, param: str | None, code: str
                                                ) -> None:
    client = await gateway_client()
    async with client.request(method, path, headers=ADMIN, data=body) as r:
        assert r.status == 400, await r.text()
        error = (await r.json())["error"]
    assert (error["param"], error["code"]) == (param, code) and error["message"]
    listed = await call(client, "GET", "/admin/users")
    assert [m["name"] for m in listed["data"]] == ["alice", "bob"]  # nothing made
