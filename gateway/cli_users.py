"""``variations-gateway users ...``: manage members of a running gateway over its admin API.

The admin token comes from ``$VARIATIONS_GATEWAY_ADMIN_TOKEN`` (never a flag: flags
land in shell history and ``ps``). Plain ``urllib``: one request per command, and no
redirect followed (:mod:`gateway.cli_http`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import urllib.parse
from typing import Any

from gateway.cli_http import ADMIN_TOKEN_ENV, URL_HELP, AdminError, admin_call
from gateway.members import QUOTA_KEYS

QUOTA_FLAGS = QUOTA_KEYS  # --images-per-day ..., as the admin API takes them


def request(url: str | None, method: str, path: str, body: object = None) -> Any:
    return json.loads(admin_call(url, method, path, body) or b"{}")


def _quota(args: argparse.Namespace) -> dict[str, Any]:
    """``--images-per-day 10`` and friends; ``none`` means unlimited."""
    out: dict[str, Any] = {}
    for key in QUOTA_FLAGS:
        raw = getattr(args, key, None)
        if raw is None:
            continue
        try:
            out[key] = None if raw == "none" else (
                _finite(raw) if key == "budget_usd_per_month" else int(raw))
        except ValueError:
            raise AdminError(f"--{key.replace('_', '-')}: expected a number or none, "
                             f"not {raw!r}") from None
    return out


def _finite(raw: str) -> float:
    """``float`` without nan and inf (which json.dumps would send as NaN, Infinity)."""
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError(raw)
    return value


def _expiry(raw: str | None) -> Any:
    if raw is None or raw == "none":
        return None
    if not raw.replace(".", "", 1).isdigit():
        return raw  # ISO 8601: the gateway checks it
    try:
        return _finite(raw)
    except ValueError:
        raise AdminError(f"expected an ISO 8601 time or unix seconds, not {raw[:40]!r}"
                         ) from None


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _limits(member: dict[str, Any]) -> str:
    q = member["quota"]
    shown = {"day": q["images_per_day"], "month": q["images_per_month"],
             "usd/month": q["budget_usd_per_month"]}
    return ", ".join(f"{k} {v}" for k, v in shown.items() if v is not None) or "unlimited"


def _row(m: dict[str, Any]) -> list[str]:
    state = "blocked" if m.get("blocked") else "expired" if m.get("expired") else "active"
    return [m["name"], m["source"], state, str(len(m["tokens"])), m["expires_at"] or "-",
            _limits(m)]


HEAD = ["NAME", "SOURCE", "STATE", "TOKENS", "EXPIRES", "IMAGES (quota)"]


def _show_token(made: dict[str, Any]) -> None:
    print(f"Token for {made['name']} (shown once; give it to them, it is not stored):")
    print(f"  {made['token']}")
    print(f"  token id: {made['token_id']} (revoke just this one with "
          f"`users revoke {made['name']} --token {made['token_id']}`)")


def _add(url: str, path: str, args: argparse.Namespace) -> None:
    body: dict[str, Any] = {"name": args.name, "quota": _quota(args) or None}
    if args.expires:
        body["expires_at"] = _expiry(args.expires)
    _show_token(request(url, "POST", "/admin/users", body))


def _list(url: str, path: str, args: argparse.Namespace) -> None:
    print(table([HEAD, *(_row(m) for m in request(url, "GET", path)["data"])]))


def _show(url: str, path: str, args: argparse.Namespace) -> None:
    m = request(url, "GET", path)
    print(table([HEAD, _row(m)]))
    print()
    print(table([["TOKEN ID", "CREATED", "EXPIRES"], *(
        [t["id"], t["created_at"], (t["expires_at"] or "-") + (
            " (expired)" if t["expired"] else "")] for t in m["tokens"])]))


def _rotate(url: str, path: str, args: argparse.Namespace) -> None:
    body: dict[str, Any] = {"revoke_others": args.revoke_others}
    if args.expires:
        body["expires_at"] = _expiry(args.expires)
    made = request(url, "POST", path + "/tokens", body)
    _show_token(made)
    if made["revoked"]:
        print(f"  revoked {made['revoked']} older token(s)")


def _revoke(url: str, path: str, args: argparse.Namespace) -> None:
    suffix = f"/tokens/{urllib.parse.quote(args.token, safe='')}" if args.token else "/tokens"
    print(f"{args.name}: revoked {request(url, 'DELETE', path + suffix)['revoked']} token(s)")


def _set_quota(url: str, path: str, args: argparse.Namespace) -> None:
    print(table([HEAD, _row(request(url, "PATCH", path, {"quota": _quota(args)}))]))


def _expire(url: str, path: str, args: argparse.Namespace) -> None:
    print(table([HEAD, _row(request(url, "PATCH", path,
                                    {"expires_at": _expiry(args.when)}))]))


def _remove(url: str, path: str, args: argparse.Namespace) -> None:
    request(url, "DELETE", path)
    print(f"{args.name}: removed (their audit records stay)")


ACTIONS = {"add": _add, "list": _list, "show": _show, "rotate": _rotate, "revoke": _revoke,
           "set-quota": _set_quota, "expire": _expire, "remove": _remove}


def run(args: argparse.Namespace) -> int:
    name = getattr(args, "name", None)
    path = "/admin/users" + (f"/{urllib.parse.quote(name, safe='')}" if name else "")
    try:
        ACTIONS[args.action](args.url, path, args)
    except AdminError as exc:
        print(f"variations-gateway users {args.action}: {exc}", file=sys.stderr)
        return 1
    return 0


def _quota_flags(p: argparse.ArgumentParser) -> None:
    for key in QUOTA_FLAGS:
        p.add_argument("--" + key.replace("_", "-"), dest=key, metavar="N|none")


def add_parser(sub: Any) -> None:
    u = sub.add_parser("users", help="manage members of a running gateway (admin API; "
                       f"admin token from ${ADMIN_TOKEN_ENV})")
    u.add_argument("--url", default=None, help=URL_HELP)
    u.set_defaults(func=run)
    acts = u.add_subparsers(dest="action", required=True)
    a = acts.add_parser("add", help="make a member; prints its token once")
    a.add_argument("name")
    a.add_argument("--expires", help="ISO 8601 time or unix seconds")
    _quota_flags(a)
    acts.add_parser("list", help="every member: source, state, tokens, expiry, quota")
    for verb, text in (("show", "one member and its token ids"),
                       ("remove", "remove a member (their audit stays)")):
        acts.add_parser(verb, help=text).add_argument("name")
    r = acts.add_parser("rotate", help="a new token (at most two; a third retires the "
                        "oldest)")
    r.add_argument("name")
    r.add_argument("--revoke-others", action="store_true", help="revoke the old ones now")
    r.add_argument("--expires", help="this token's expiry: ISO 8601 or unix seconds")
    v = acts.add_parser("revoke", help="revoke every token of a member (or --token ID)")
    v.add_argument("name")
    v.add_argument("--token", help="revoke only this token id (see users show)")
    q = acts.add_parser("set-quota", help="change a member's limits (none: unlimited)")
    q.add_argument("name")
    _quota_flags(q)
    e = acts.add_parser("expire", help="set when a member expires (none: never)")
    e.add_argument("name")
    e.add_argument("when", help="ISO 8601 time, unix seconds, or none")
