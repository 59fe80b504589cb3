"""``variations-gateway usage --month YYYY-MM``: the chargeback table from a gateway's
``GET /admin/usage.csv``, with the admin token from ``$VARIATIONS_GATEWAY_ADMIN_TOKEN``."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime

from gateway.cli_http import RedirectRefused, open_url

TOKEN_ENV = "VARIATIONS_GATEWAY_ADMIN_TOKEN"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    u = sub.add_parser("usage", help="per-member images, requests, cache hits and spend "
                       "for a month (chargeback), from the audit trail")
    u.add_argument("--month", default=datetime.now(UTC).strftime("%Y-%m"),
                   help="YYYY-MM, UTC (default: this month)")
    u.add_argument("--url", default=None, help="gateway URL (default: "
                   "$VARIATIONS_GATEWAY_URL or http://127.0.0.1:8080)")
    u.add_argument("--csv", action="store_true", help="print the CSV as the gateway sends it")
    u.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    token = os.environ.get(TOKEN_ENV)
    if not token:
        print(f"variations-gateway usage: set {TOKEN_ENV} to the admin token",
              file=sys.stderr)
        return 2
    base = args.url or os.environ.get("VARIATIONS_GATEWAY_URL") or "http://127.0.0.1:8080"
    url = (base.rstrip("/") + "/admin/usage.csv?"
           + urllib.parse.urlencode({"month": args.month}))
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with open_url(request, timeout=60) as r:
            text = r.read().decode("utf-8")
    except RedirectRefused as exc:
        print(f"variations-gateway usage: {exc}", file=sys.stderr)
        return 1
    except urllib.error.HTTPError as exc:
        print(f"variations-gateway usage: {exc.code}: {_message(exc.read())}",
              file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"variations-gateway usage: cannot reach {base}: {exc}", file=sys.stderr)
        return 1
    print(text if args.csv else table(text), end="" if args.csv else "\n")
    return 0


def _message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:200]


def table(text: str) -> str:
    """The CSV as aligned columns, numbers right-aligned, with a total line."""
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return ""
    header, body = rows[0], rows[1:]
    if body:
        totals = ["total", body[0][1]] + [
            f"{sum(float(r[i]) for r in body):.6f}" if header[i] == "spend_usd"
            else str(sum(int(r[i]) for r in body)) for i in range(2, len(header))]
        body = [*body, totals]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in [header, *body]]
    return "\n".join(lines)
