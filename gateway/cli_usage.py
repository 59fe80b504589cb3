"""``variations-gateway usage --month YYYY-MM``: the chargeback table from a gateway's
``GET /admin/usage.csv``, with the admin token from ``$VARIATIONS_GATEWAY_ADMIN_TOKEN``."""

from __future__ import annotations

import argparse
import csv
import io
import sys
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime

from gateway.cli_http import URL_HELP, AdminError, MissingToken, admin_call


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    u = sub.add_parser("usage", help="per-member images, requests, cache hits and spend "
                       "for a month (chargeback), from the audit trail")
    u.add_argument("--month", default=datetime.now(UTC).strftime("%Y-%m"),
                   help="YYYY-MM, UTC (default: this month)")
    u.add_argument("--url", default=None, help=URL_HELP)
    u.add_argument("--csv", action="store_true", help="print the CSV as the gateway sends it")
    u.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = "/admin/usage.csv?" + urllib.parse.urlencode({"month": args.month})
    try:
        text = admin_call(args.url, "GET", path, timeout=60).decode("utf-8")
    except AdminError as exc:
        print(f"variations-gateway usage: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, MissingToken) else 1
    print(text if args.csv else table(text), end="" if args.csv else "\n")
    return 0


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
