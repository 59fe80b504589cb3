"""The audit trail for abuse monitoring and chargeback: every request, refused ones too.

Each record is committed before its answer leaves, so every 200 a client saw is on disk:
``audit.kind: sqlite`` keeps it in one local SQLite file (:mod:`gateway.audit.sqlite`);
``audit.kind: postgres`` commits it to the same local file as an outbox, and a shipper
moves it to one PostgreSQL database every replica shares (:mod:`gateway.audit.outbox`,
:mod:`gateway.audit.postgres`). Nothing secret is recorded: the member name, never the
token; the raw ``user`` form field and the HMAC sent upstream for it, so an admin can map
a provider's abuse report back to a member and end user.

The columns of both databases, and their in-place migrations, are derived from
:class:`AuditRecord`'s fields (:func:`columns`): a field added at its end just works.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

# Retention runs in the background this often, deleting at most PURGE_BATCH rows per
# statement: one DELETE of an hour's expired rows held the event loop for seconds
# (2.9 s for 360,000 rows, 100 requests a second), and every request with it.
PURGE_EVERY_SECONDS = 60.0
PURGE_BATCH = 1000
# The audit schema's version: SQLite's PRAGMA user_version, PostgreSQL's schema_version
# table. Added columns need no new version (they are migrated from the fields).
SCHEMA_VERSION = 1
VARIATIONS_ROUTE = "/v1/images/variations"


@dataclass
class AuditRecord:
    """Filled in by the request path as it learns things; written once at the end."""

    request_id: str
    ts: float
    route: str
    client: str | None = None
    member: str | None = None
    auth_error: str | None = None  # why the member is unknown (missing_token, bad_token)
    end_user: str | None = None  # the raw ``user`` form field
    end_user_hash: str | None = None  # what upstream backends saw
    image_sha256: str | None = None
    n: int | None = None
    size: str | None = None
    model: str | None = None
    backend: str | None = None
    cache: str | None = None
    images_charged: int = 0
    cost_usd: float = 0.0
    status: int = 0
    error_code: str | None = None
    latency_ms: float = 0.0
    upload_bytes: int = 0
    # The upstream's reported token usage (gpt-image), when it bills per token.
    usage_input_tokens: int | None = None
    usage_output_tokens: int | None = None
    # An admin action (``user.create``, ``user.rotate``...) and the member it acted on;
    # ``member`` then names the admin token (its id, never the token).
    action: str | None = None
    target: str | None = None
    # The variation controls the request set (issue 22); None: not sent.
    strength: float | None = None
    seed: int | None = None
    prompt: str | None = None


Kind = Literal["integer", "real", "text", "boolean"]
_KINDS: dict[type, Kind] = {bool: "boolean", int: "integer", float: "real", str: "text"}


def columns() -> dict[str, Kind]:
    """Every :class:`AuditRecord` field and its column kind, in field order."""
    hints = typing.get_type_hints(AuditRecord)
    out: dict[str, Kind] = {}
    for f in dataclasses.fields(AuditRecord):
        hint = hints[f.name]
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
        out[f.name] = _KINDS[hint]
    return out


COLUMNS: dict[str, Kind] = columns()
NAMES: list[str] = list(COLUMNS)


def coerce(kind: Kind, value: object) -> object:
    """``value`` as a column of ``kind`` holds it: SQLite keeps whatever was stored, and
    one mistyped value must not stop a whole batch from shipping to PostgreSQL."""
    if value is None or kind == "text":
        return None if value is None else str(value)
    if kind == "boolean":
        return bool(value)
    try:
        number = float(value) if isinstance(value, int | float | str) else None
    except ValueError:
        return None
    if number is None or number != number or number in (float("inf"), float("-inf")):
        return None
    return number if kind == "real" else int(number) if isinstance(value, float | str) \
        else value


@dataclass(frozen=True)
class MemberUsage:
    """One member's use in a period, from the audit trail (the ledger's figures)."""

    images: int = 0
    requests: int = 0
    cache_hits: int = 0
    spend_usd: float = 0.0


def usage_sql(placeholder: typing.Callable[[int], str]) -> str:
    """Per member over ``[start, end)``: images charged, answered variations requests,
    cache hits, spend: what the quota ledger counts (a request is counted when a
    variations answer carried a cache status; a hit generated nothing)."""
    return ("SELECT member, coalesce(sum(images_charged), 0), count(cache), "
            "count(*) FILTER (WHERE cache = 'HIT'), coalesce(sum(cost_usd), 0) FROM audit "
            f"WHERE route = '{VARIATIONS_ROUTE}' AND member IS NOT NULL "
            f"AND ts >= {placeholder(1)} AND ts < {placeholder(2)} GROUP BY member")


def usage_from_rows(rows: typing.Iterable[typing.Sequence[Any]]) -> dict[str, MemberUsage]:
    return {str(m): MemberUsage(int(i), int(r), int(h), round(float(s), 6))
            for m, i, r, h, s in rows}


_MONTH = re.compile(r"(\d{4})-(\d{2})")


def month_range(text: str) -> tuple[float, float]:
    """``YYYY-MM`` as its UTC ``[start, end)`` in unix seconds (the ledger's months);
    ValueError when it is not one."""
    match = _MONTH.fullmatch(text)
    if match is None:
        raise ValueError(text)
    year, month = int(match[1]), int(match[2])
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    return start.timestamp(), end.timestamp()


@dataclass(frozen=True)
class OutboxStats:
    """Records committed locally and not yet in PostgreSQL."""

    records: int
    oldest_ts: float | None


class AuditTrail(Protocol):
    """What the app needs of the audit trail, whichever database holds it."""

    retention_days: int

    def write(self, record: AuditRecord) -> asyncio.Future[None]:
        """Queue ``record``; the future resolves when it is committed locally (await it
        before answering). The row is taken now: later changes to ``record`` are not in it."""

    async def search(self, *, member: str | None = None, end_user: str | None = None,
                     action: str | None = None, target: str | None = None,
                     since: float | None = None, until: float | None = None,
                     before_id: int | None = None, limit: int = 100
                     ) -> list[dict[str, Any]]:
        """Newest first; ``before_id`` continues a page (the last ``id`` seen)."""

    async def member_usage(self, start: float, end: float) -> dict[str, MemberUsage]:
        """Each member's use over ``[start, end)`` (``/admin/usage.csv``)."""

    async def team_usage(self, now: float) -> dict[str, dict[str, float]] | None:
        """``/admin/usage``'s rows for every replica, or None: the quota ledger answers."""

    def outbox_stats(self) -> OutboxStats:
        """What waits to be shipped (nothing, with ``kind: sqlite``)."""

    def status(self) -> dict[str, object]:
        """For ``/readyz``: informative only, never a reason to be unready."""

    async def run(self) -> None:
        """Background work for the app's life: retention, shipping."""

    async def aclose(self) -> None:
        """Commit what is queued and close."""
