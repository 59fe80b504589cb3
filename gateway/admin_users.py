"""``/admin/users``: members and their tokens, managed live through the admin API.

Every route takes the admin token, answers JSON (errors in the OpenAI envelope) and
leaves an audit record naming the admin token's id, the action and the member acted
on. A new token is in the one answer that creates it and nowhere else: not in any
listing, log line or audit record. After a change the authenticator here re-reads the
store at once; other replicas hear of it from the store (:mod:`gateway.members`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from gateway.admin import require_admin
from gateway.errors import invalid
from gateway.keys import AUDIT_RECORD, AUTH, QUOTA, snapshot
from gateway.members import (
    Issued,
    Member,
    Members,
    check_keys,
    check_name,
    iso,
    parse_quota,
    parse_time,
)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/admin/users", create)
    router.add_get("/admin/users", list_members)
    router.add_get("/admin/users/{name}", show)
    router.add_patch("/admin/users/{name}", update)
    router.add_delete("/admin/users/{name}", remove)
    router.add_post("/admin/users/{name}/tokens", rotate)
    router.add_delete("/admin/users/{name}/tokens", revoke)
    router.add_delete("/admin/users/{name}/tokens/{token_id}", revoke)


def _members(request: web.Request, action: str) -> Members:
    """Admin only; the audit record gets ``action`` and the member named in the path."""
    require_admin(request, action)
    name = request.match_info.get("name")
    if name is not None:
        request[AUDIT_RECORD].target = name[:64]
    members = request.app[AUTH].members
    assert members is not None  # build_app always gives the authenticator a store
    return members


async def _body(request: web.Request, known: tuple[str, ...]) -> dict[str, Any]:
    """The JSON object sent (``{}`` for an empty body), with only ``known`` keys."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: [[[[...
        raise invalid("The body is not valid JSON.", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("Expected a JSON object.", None, "invalid_type")
    check_keys(body, known)
    return body


async def _shown(request: web.Request, member: Member) -> dict[str, Any]:
    out = member.public(snapshot(request).config.quota_defaults, request.app[AUTH].clock())
    out["blocked"] = await request.app[QUOTA].is_blocked(member.name)
    return out


async def _changed(request: web.Request, issued: Issued, status: int = 200,
                   **extra: object) -> web.Response:
    await request.app[AUTH].refresh()  # this replica: at once; the others: pub/sub
    out: dict[str, Any] = dict(extra)
    if issued.member is not None:
        out = {**(await _shown(request, issued.member)), **out}
    return web.json_response(out, status=status)


async def create(request: web.Request) -> web.Response:
    """``POST /admin/users {"name", "quota"?, "expires_at"?}`` -> 201 with the token."""
    members = _members(request, "user.create")
    body = await _body(request, ("name", "quota", "expires_at"))
    name = check_name(body.get("name"))
    request[AUDIT_RECORD].target = name
    quota = parse_quota(body["quota"]) if body.get("quota") is not None else {}
    expires = parse_time(body.get("expires_at"), "expires_at", members.clock())
    issued = await members.create(name, quota, expires)
    return await _changed(request, issued, 201, token=issued.token,
                          token_id=issued.member.tokens[-1].id if issued.member else None)


async def list_members(request: web.Request) -> web.Response:
    """``GET /admin/users``: config and API members, no token material."""
    members = _members(request, "user.list")
    snapshot = await members.store.load()
    return web.json_response({"data": [await _shown(request, snapshot.members[name])
                                       for name in sorted(snapshot.members)]})


async def show(request: web.Request) -> web.Response:
    members = _members(request, "user.show")
    return web.json_response(await _shown(request, await members.get(
        request.match_info["name"])))


async def update(request: web.Request) -> web.Response:
    """``PATCH /admin/users/{name} {"quota"?, "expires_at"?}``."""
    members = _members(request, "user.update")
    body = await _body(request, ("quota", "expires_at"))
    if not body:
        raise invalid("Nothing to change: send quota and/or expires_at.", None)
    quota: Mapping[str, float | None] | None = None
    if "quota" in body:
        quota = parse_quota(body["quota"])
    expires = parse_time(body.get("expires_at"), "expires_at", members.clock())
    issued = await members.update(request.match_info["name"], quota, expires,
                                  "expires_at" in body)
    return await _changed(request, issued)


async def rotate(request: web.Request) -> web.Response:
    """``POST /admin/users/{name}/tokens {"revoke_others"?, "expires_at"?}`` -> 201 with a
    new token. A member holds at most two: a third retires the oldest."""
    members = _members(request, "user.rotate")
    body = await _body(request, ("revoke_others", "expires_at"))
    revoke_others = body.get("revoke_others", False)
    if not isinstance(revoke_others, bool):
        raise invalid("Invalid 'revoke_others': expected true or false.", "revoke_others",
                      "invalid_type")
    expires = parse_time(body.get("expires_at"), "expires_at", members.clock())
    issued = await members.rotate(request.match_info["name"], revoke_others, expires)
    assert issued.member is not None
    new = issued.member.tokens[-1]
    return await _changed(request, issued, 201, token=issued.token, token_id=new.id,
                          token_expires_at=iso(new.expires_at), revoked=issued.revoked)


async def revoke(request: web.Request) -> web.Response:
    """``DELETE /admin/users/{name}/tokens[/{token_id}]``: every token, or one."""
    members = _members(request, "user.revoke")
    issued = await members.revoke(request.match_info["name"],
                                  request.match_info.get("token_id"))
    return await _changed(request, issued, revoked=issued.revoked)


async def remove(request: web.Request) -> web.Response:
    """``DELETE /admin/users/{name}``: the member and its tokens; the audit stays."""
    members = _members(request, "user.remove")
    name = request.match_info["name"]
    issued = await members.remove(name)
    return await _changed(request, issued, name=name, removed=True, revoked=issued.revoked)
