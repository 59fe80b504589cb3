"""``audit.kind: sqlite``: the audit trail in one local SQLite file (WAL).

A record is committed with the other records of its event-loop turn (group commit)
before the response leaves. With ``audit.kind: postgres`` the same table is the outbox:
rows leave it once PostgreSQL has committed them (:mod:`gateway.audit.outbox`).
Schema version: ``PRAGMA user_version``; columns missing from an older file are added in
place from :data:`gateway.audit.COLUMNS`.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from gateway import audit
from gateway.audit import COLUMNS, NAMES, AuditRecord, MemberUsage, OutboxStats
from gateway.logs import printable
from gateway.sqlite import GroupCommit, failures_translated, open_db

log = structlog.get_logger("gateway.audit")
_TYPES = {"integer": "INTEGER", "real": "REAL", "text": "TEXT", "boolean": "INTEGER"}
Row = tuple[int, tuple[object, ...]]


def _schema(db: sqlite3.Connection) -> None:
    cols = ", ".join(f"{name} {_TYPES[kind]}" for name, kind in COLUMNS.items())
    db.executescript(
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
        -- Admin actions are a handful among millions of requests: a partial index.
        CREATE INDEX IF NOT EXISTS audit_action_id ON audit (action, id)
            WHERE action IS NOT NULL;
        CREATE INDEX IF NOT EXISTS audit_target_id ON audit (target, id)
            WHERE target IS NOT NULL;
        """)
    # Fields added since the table was first made: SQLite adds their columns in place.
    have = {row[1] for row in db.execute("PRAGMA table_info(audit)")}
    for name, kind in COLUMNS.items():
        if name not in have:
            db.execute(f"ALTER TABLE audit ADD COLUMN {name} {_TYPES[kind]}")
    if db.execute("PRAGMA user_version").fetchone()[0] < audit.SCHEMA_VERSION:
        db.execute(f"PRAGMA user_version = {int(audit.SCHEMA_VERSION)}")


class AuditLog:
    """The SQLite audit trail (and, with ``kind: postgres``, the outbox)."""

    def __init__(self, path: str | Path, retention_days: int, *, stdout: bool = False) -> None:
        self.path = Path(path)
        self._db = open_db(path, cache_kib=256)  # append-mostly: inserts need few pages
        _schema(self._db)
        self._insert = (f"INSERT INTO audit ({', '.join(NAMES)}) VALUES "
                        f"({', '.join('?' for _ in NAMES)})")
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
               for v in (getattr(record, c) for c in NAMES)]
        done = self._writes.submit(lambda db: db.execute(self._insert, row))
        if self.stdout:
            log.info("audit", **dict(zip(NAMES, row, strict=True)))
        return done

    def query(self, *, member: str | None = None, end_user: str | None = None,
              action: str | None = None, target: str | None = None,
              since: float | None = None, until: float | None = None,
              before_id: int | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first; ``before_id`` continues a page (the last ``id`` seen).

        ``end_user`` matches the raw ``user`` field or the HMAC upstream saw for it, so a
        provider's abuse report maps back to the member and end user.
        """
        common = [("member = ?", member), ("action = ?", action), ("target = ?", target),
                  ("ts >= ?", since), ("ts < ?", until), ("id < ?", before_id)]
        if end_user is None:
            return self._select(common, limit)
        # One query per column, each walking its (column, id) index back from the newest
        # row; an OR of the two would sort every matching row first.
        rows = {r["id"]: r for column in ("end_user", "end_user_hash")
                for r in self._select([(f"{column} = ?", end_user), *common], limit)}
        return [rows[i] for i in sorted(rows, reverse=True)[:limit]]

    async def search(self, *, member: str | None = None, end_user: str | None = None,
                     action: str | None = None, target: str | None = None,
                     since: float | None = None, until: float | None = None,
                     before_id: int | None = None, limit: int = 100
                     ) -> list[dict[str, Any]]:
        return self.query(member=member, end_user=end_user, action=action, target=target,
                          since=since, until=until, before_id=before_id, limit=limit)

    def _select(self, conditions: Sequence[tuple[str, object]], limit: int
                ) -> list[dict[str, Any]]:
        where = [clause for clause, value in conditions if value is not None]
        args = [value for _, value in conditions if value is not None]
        sql = "SELECT id, " + ", ".join(NAMES) + " FROM audit"
        if where:
            sql += " WHERE " + " AND ".join(where)
        cur = self._db.execute(sql + " ORDER BY id DESC LIMIT ?", [*args, limit])
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    async def member_usage(self, start: float, end: float) -> dict[str, MemberUsage]:
        """Read on a connection of its own in a thread: a month of a busy gateway's rows
        must not hold the event loop (WAL lets it read beside the writer)."""
        return await asyncio.to_thread(self._member_usage, start, end)

    def _member_usage(self, start: float, end: float) -> dict[str, MemberUsage]:
        # A path with "?", "#" or "%" in it stays a path (as_uri quotes it); a locked or
        # missing file is the store's 503, never a 500.
        with failures_translated():
            db = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True)
            try:
                db.execute("PRAGMA busy_timeout=2000")
                return audit.usage_from_rows(
                    db.execute(audit.usage_sql(lambda _: "?"), (start, end)).fetchall())
            finally:
                db.close()

    async def team_usage(self, now: float) -> dict[str, dict[str, float]] | None:
        return None  # one box: the quota ledger answers

    # ---- the outbox (audit.kind: postgres)
    def pending(self, limit: int) -> list[Row]:
        """The oldest ``limit`` rows not yet shipped, as (id, values in NAMES order)."""
        cur = self._db.execute(
            f"SELECT id, {', '.join(NAMES)} FROM audit ORDER BY id LIMIT ?", (limit,))
        return [(row[0], tuple(row[1:])) for row in cur.fetchall()]

    def acknowledge(self, first_id: int, last_id: int) -> None:
        """Rows ``first_id..last_id`` are committed in PostgreSQL: they leave the outbox."""
        self._db.execute("DELETE FROM audit WHERE id BETWEEN ? AND ?", (first_id, last_id))

    def outbox_stats(self) -> OutboxStats:
        return OutboxStats(0, None)  # kind: sqlite: nothing waits to be shipped

    def backlog(self) -> OutboxStats:
        """Rows in the outbox and the oldest one's time. Rows leave it oldest first (id
        ranges, in order), so the rows left span ids min..max: two index lookups where
        ``count(*)`` read the whole table on the event loop, at its largest exactly
        while PostgreSQL is away, and for every unauthenticated ``/readyz``."""
        low, high, oldest = self._db.execute(
            "SELECT (SELECT min(id) FROM audit), (SELECT max(id) FROM audit), "
            "(SELECT min(ts) FROM audit)").fetchone()
        return OutboxStats(0 if low is None else int(high) - int(low) + 1, oldest)

    def status(self) -> dict[str, object]:
        return {"kind": "sqlite"}

    # ---- retention
    def purge_batch(self, now: float | None = None) -> int:
        """Delete up to :data:`PURGE_BATCH` records past ``retention_days``; how many."""
        cutoff = (time.time() if now is None else now) - self.retention_days * 86400
        return self._db.execute(
            "DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE ts < ? LIMIT ?)",
            (cutoff, audit.PURGE_BATCH)).rowcount

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
            await asyncio.sleep(0 if deleted >= audit.PURGE_BATCH
                                else audit.PURGE_EVERY_SECONDS)

    async def run(self) -> None:
        await self.keep_retention()

    def flush(self) -> None:
        """Commit what is queued now (shutdown, tests)."""
        self._writes.flush()

    def close(self) -> None:
        self._writes.flush()
        self._db.close()

    async def aclose(self) -> None:
        self.close()
