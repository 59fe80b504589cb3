"""``GET /v1/usage`` for members and the ``/admin/`` API for the gateway admin."""

from __future__ import annotations

import csv
import io
import time
from datetime import UTC, datetime

from aiohttp import web

from gateway import members
from gateway.audit import MemberUsage, month_range
from gateway.errors import ApiError, invalid
from gateway.keys import AUDIT, AUDIT_RECORD, AUTH, QUOTA, snapshot

MAX_AUDIT_PAGE = 1000


async def usage(request: web.Request) -> web.Response:
    """The caller's own usage and what remains of each limit (the GIMP plug-in shows it)."""
    principal = request.app[AUTH].member(request)
    request[AUDIT_RECORD].member = principal.name
    quota = request.app[QUOTA]
    statuses = await quota.usage(principal)
    blocked = principal.quota.blocked or await quota.is_blocked(principal.name)
    return web.json_response({
        "user": principal.name,
        "blocked": blocked,
        "limits": {s.name: s.as_json() for s in statuses},
    })


def require_admin(request: web.Request, action: str | None = None) -> None:
    """Admin routes only; the audit record names the admin token's id (and ``action``)."""
    record = request[AUDIT_RECORD]
    record.action = action
    try:
        who = request.app[AUTH].admin(request)
    except ApiError as exc:
        if exc.status == 403:  # a token, but not the admin's: the audit says whose
            try:
                record.member = request.app[AUTH].member(request).name
            except ApiError:
                record.auth_error = "bad_token"
        raise
    record.member = who


def _known(request: web.Request, name: str) -> bool:
    return any(p.name == name for p in request.app[AUTH].principals())


async def admin_usage(request: web.Request) -> web.Response:
    """Per user: images today and this month, requests, cache hits, spend. With
    ``audit.kind: postgres`` from the team's audit trail (every replica), else the ledger;
    with PostgreSQL away from the ledger too (``source`` says which) rather than a 503."""
    require_admin(request)
    config = snapshot(request).config
    team = await request.app[AUDIT].team_usage(time.time())
    source = "audit" if team is not None else "ledger"
    rows = team if team is not None else await request.app[QUOTA].all_usage()
    for name in [*config.users, *(p.name for p in request.app[AUTH].principals())]:
        rows.setdefault(name, {"images_today": 0, "images_this_month": 0, "requests_today": 0,
                               "cache_hits_today": 0, "spend_usd_this_month": 0.0})
    for name, row in rows.items():
        row["blocked"] = await request.app[QUOTA].is_blocked(name) or (
            name in config.users and config.users[name].quota.blocked)
    return web.json_response({"users": dict(sorted(rows.items())), "source": source})


def _time(value: str | None, param: str) -> float | None:
    return None if value is None or value == "" else members.instant(value, param)


def _int(value: str | None, param: str, default: int | None) -> int | None:
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise invalid(f"Invalid '{param}': expected an integer.", param, "invalid_type"
                      ) from None
    if not -(2**63) <= number < 2**63:  # what SQLite can compare against
        raise invalid(f"Invalid '{param}': integer out of range.", param, "invalid_value")
    return number


AUDIT_PARAMS = ("user", "end_user", "action", "target", "since", "until", "before", "limit")


async def admin_audit(request: web.Request) -> web.Response:
    """Audit records, newest first. Page with ``before`` = the last ``id`` of a page."""
    require_admin(request)
    q = request.query
    for name in q:
        # A misspelt filter (``?member=bob``) must not silently return everyone's rows.
        if name not in AUDIT_PARAMS:
            shown = name[:40].encode("unicode_escape").decode("ascii")
            raise invalid(f"Unknown parameter: '{shown}' (known: {', '.join(AUDIT_PARAMS)}).",
                          shown, "unknown_parameter")
    limit = _int(q.get("limit"), "limit", 100)
    assert limit is not None
    if not 1 <= limit <= MAX_AUDIT_PAGE:
        raise invalid(f"Invalid 'limit': expected 1 to {MAX_AUDIT_PAGE}.", "limit")
    rows = await request.app[AUDIT].search(
        member=q.get("user") or None, end_user=q.get("end_user") or None,
        action=q.get("action") or None, target=q.get("target") or None,
        since=_time(q.get("since"), "since"), until=_time(q.get("until"), "until"),
        before_id=_int(q.get("before"), "before", None), limit=limit + 1)
    has_more = len(rows) > limit  # one row past the page says whether another follows
    rows = rows[:limit]
    body: dict[str, object] = {"data": rows, "has_more": has_more}
    if has_more:
        body["next_before"] = rows[-1]["id"]
    return web.json_response(body)


async def _set_block(request: web.Request, blocked: bool) -> web.Response:
    require_admin(request, "user.block" if blocked else "user.unblock")
    name = request.match_info["name"]
    request[AUDIT_RECORD].target = name[:64]
    if name not in snapshot(request).config.users and not _known(request, name):
        raise ApiError(404, f"No member named '{name[:64]}'.", code="user_not_found")
    await request.app[QUOTA].set_blocked(name, blocked)
    return web.json_response({"user": name, "blocked": blocked})


async def block(request: web.Request) -> web.Response:
    return await _set_block(request, True)


async def unblock(request: web.Request) -> web.Response:
    return await _set_block(request, False)


CSV_FIELDS = ("member", "month", "images", "requests", "cache_hits", "spend_usd")


async def usage_csv(request: web.Request) -> web.Response:
    """``?month=YYYY-MM`` (default: this UTC month): one row per member, from the audit
    trail (the team's with ``audit.kind: postgres``), for chargeback."""
    require_admin(request)
    config = snapshot(request).config
    if config.state.kind == "redis" and config.audit.kind == "sqlite":
        # Replicas behind a load balancer: this replica's file holds only its own share.
        raise ApiError(409, "usage.csv counts the audit trail, and with state.kind redis "
                       "and audit.kind sqlite each replica keeps its own: set audit.kind: "
                       "postgres for a team-wide chargeback (GET /admin/usage shows this "
                       "month's totals from the shared ledger).", code="audit_not_shared")
    month = request.query.get("month") or datetime.now(UTC).strftime("%Y-%m")
    try:
        start, end = month_range(month)
    except ValueError:
        shown = month[:20].encode("unicode_escape").decode("ascii")
        raise invalid(f"Invalid 'month': expected YYYY-MM, got '{shown}'.", "month"
                      ) from None
    usage = await request.app[AUDIT].member_usage(start, end)
    for principal in request.app[AUTH].principals():
        usage.setdefault(principal.name, MemberUsage())
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for name, u in sorted(usage.items()):
        # A spreadsheet runs a cell that starts with = + - @ as a formula.
        cell = f"'{name}" if name[:1] in ("=", "+", "-", "@") else name
        writer.writerow([cell, month, u.images, u.requests, u.cache_hits, f"{u.spend_usd:.6f}"])
    return web.Response(text=out.getvalue(), content_type="text/csv", headers={
        "Content-Disposition": f'attachment; filename="usage-{month}.csv"'})
