"""The audit trail for abuse monitoring: every request, refused ones too.

Each record is one SQLite row (WAL; committed with the other records of its event-loop
turn before the response leaves, so every 200 a client saw is on disk) and one
structlog event. Nothing secret is recorded: the member
name, never the token; the raw ``user`` form field and the HMAC sent upstream for it,
so an admin can map a provider's abuse report back to a member and end user.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from gateway.logs import printable
from gateway.sqlite import GroupCommit, open_db

log = structlog.get_logger("gateway.audit")
# Retention runs in the background this often, deleting at most PURGE_BATCH rows per
# statement: one DELETE of an hour's expired rows held the event loop for seconds
# (2.9 s for 360,000 rows, 100 requests a second), and every request with it.
PURGE_EVERY_SECONDS = 60.0
PURGE_BATCH = 1000


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
    # The variation controls the request set (issue 22); None: not sent.
    strength: float | None = None
    seed: int | None = None
    prompt: str | None = None


_COLUMNS = [f.name for f in dataclasses.fields(AuditRecord)]
# SQLite column types; every other column is TEXT.
_TYPES = {**dict.fromkeys(("ts", "latency_ms", "cost_usd", "strength"), "REAL"),
          **dict.fromkeys(("n", "images_charged", "status", "upload_bytes",
                           "usage_input_tokens", "usage_output_tokens", "seed"), "INTEGER")}


class AuditLog:
    def __init__(self, path: str | Path, retention_days: int, *, stdout: bool = False) -> None:
        self._db = open_db(path, cache_kib=256)  # append-mostly: inserts need few pages
        cols = ", ".join(
            f"{c} {_TYPES.get(c, 'TEXT')}" for c in _COLUMNS)
        self._db.executescript(
            f"""
            CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY AUTOINCREMENT, {cols});
            CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts);
            -- Queries are newest first by id: (x, id) indexes answer them by walking back
            -- from the newest row, where (x, ts) made SQLite sort all of a busy member's
            -- rows first (0.5 s for a million). The (x, ts) ones are from earlier versions.
            DROP INDEX IF EXISTS audit_member;
            DROP INDEX IF EXISTS audit_end_user;
            DROP INDEX IF EXISTS audit_end_user_hash;
            CREATE INDEX IF NOT EXISTS audit_member_id ON audit (member, id);
            CREATE INDEX IF NOT EXISTS audit_end_user_id ON audit (end_user, id);
            CREATE INDEX IF NOT EXISTS audit_end_user_hash_id ON audit (end_user_hash, id);
            """)
        # Columns added since the table was first made (SQLite adds them in place).
        have = {row[1] for row in self._db.execute("PRAGMA table_info(audit)")}
        for column in ("usage_input_tokens", "usage_output_tokens", "strength", "seed",
                       "prompt"):
            if column not in have:
                self._db.execute(
                    f"ALTER TABLE audit ADD COLUMN {column} {_TYPES.get(column, 'TEXT')}")
        self._insert = (f"INSERT INTO audit ({', '.join(_COLUMNS)}) VALUES "
                        f"({', '.join('?' for _ in _COLUMNS)})")
        self._writes = GroupCommit(self._db)
        self.retention_days = retention_days
        self.stdout = stdout

    def write(self, record: AuditRecord) -> asyncio.Future[None]:
        """Queue ``record``; the future resolves when it is committed (await it before
        answering). The row is taken now, so later changes to ``record`` are not in it.

        Text is stored with its control characters escaped (:func:`printable`): a
        refused request's path, ``user``, ``model`` or ``size`` is whatever a client
        sent, and an admin reads the table in a terminal (``sqlite3``) too.
        """
        row = [printable(v) if isinstance(v, str) else v
               for v in (getattr(record, c) for c in _COLUMNS)]
        done = self._writes.submit(lambda db: db.execute(self._insert, row))
        if self.stdout:
            log.info("audit", **dict(zip(_COLUMNS, row, strict=True)))
        return done

    def query(self, *, member: str | None = None, end_user: str | None = None,
              since: float | None = None, until: float | None = None,
              before_id: int | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first; ``before_id`` continues a page (the last ``id`` seen).

        ``end_user`` matches the raw ``user`` field or the HMAC upstream saw for it, so a
        provider's abuse report maps back to the member and end user.
        """
        common = [("member = ?", member), ("ts >= ?", since), ("ts < ?", until),
                  ("id < ?", before_id)]
        if end_user is None:
            return self._select(common, limit)
        # One query per column, each walking its (column, id) index back from the newest
        # row; an OR of the two would sort every matching row first.
        rows = {r["id"]: r for column in ("end_user", "end_user_hash")
                for r in self._select([(f"{column} = ?", end_user), *common], limit)}
        return [rows[i] for i in sorted(rows, reverse=True)[:limit]]

    def _select(self, conditions: Sequence[tuple[str, object]], limit: int
                ) -> list[dict[str, Any]]:
        where = [clause for clause, value in conditions if value is not None]
        args = [value for _, value in conditions if value is not None]
        sql = "SELECT id, " + ", ".join(_COLUMNS) + " FROM audit"
        if where:
            sql += " WHERE " + " AND ".join(where)
        cur = self._db.execute(sql + " ORDER BY id DESC LIMIT ?", [*args, limit])
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def purge_batch(self, now: float | None = None) -> int:
        """Delete up to :data:`PURGE_BATCH` records past ``retention_days``; how many."""
        cutoff = (time.time() if now is None else now) - self.retention_days * 86400
        return self._db.execute(
            "DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE ts < ? LIMIT ?)",
            (cutoff, PURGE_BATCH)).rowcount

    async def keep_retention(self) -> None:
        """Background task: purge expired records now and every :data:`PURGE_EVERY_SECONDS`,
        a batch at a time with requests served in between."""
        while True:
            try:
                deleted = self.purge_batch()
            except sqlite3.Error as exc:  # e.g. locked by an admin's shell: next time
                log.warning("audit_purge_failed", error=str(exc))
                deleted = 0
            # A full batch means more are due: after the requests that queued meanwhile.
            await asyncio.sleep(0 if deleted >= PURGE_BATCH else PURGE_EVERY_SECONDS)

    def close(self) -> None:
        self._writes.flush()
        self._db.close()
