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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from gateway.sqlite import GroupCommit, open_db

log = structlog.get_logger("gateway.audit")
# Retention is enforced at startup and then at most this often, by the next write.
PURGE_EVERY_SECONDS = 3600


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


_COLUMNS = [f.name for f in dataclasses.fields(AuditRecord)]


class AuditLog:
    def __init__(self, path: str | Path, retention_days: int, *, stdout: bool = False) -> None:
        self._db = open_db(path, cache_kib=256)  # append-mostly: inserts need few pages
        cols = ", ".join(
            f"{c} {'REAL' if c in ('ts', 'latency_ms', 'cost_usd') else 'INTEGER' if c in ('n', 'images_charged', 'status', 'upload_bytes') else 'TEXT'}"  # noqa: E501
            for c in _COLUMNS)
        self._db.executescript(
            f"""
            CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY AUTOINCREMENT, {cols});
            CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts);
            CREATE INDEX IF NOT EXISTS audit_member ON audit (member, ts);
            CREATE INDEX IF NOT EXISTS audit_end_user ON audit (end_user, ts);
            CREATE INDEX IF NOT EXISTS audit_end_user_hash ON audit (end_user_hash, ts);
            """)
        self._insert = (f"INSERT INTO audit ({', '.join(_COLUMNS)}) VALUES "
                        f"({', '.join('?' for _ in _COLUMNS)})")
        self._writes = GroupCommit(self._db)
        self.retention_days = retention_days
        self.stdout = stdout
        self._purged_at = 0.0

    def write(self, record: AuditRecord) -> asyncio.Future[None]:
        """Queue ``record``; the future resolves when it is committed (await it before
        answering). The row is taken now, so later changes to ``record`` are not in it."""
        row = [getattr(record, c) for c in _COLUMNS]
        done = self._writes.submit(lambda db: db.execute(self._insert, row))
        if self.stdout:
            log.info("audit", **dataclasses.asdict(record))
        now = time.time()
        if now - self._purged_at >= PURGE_EVERY_SECONDS:
            self.purge(now)
        return done

    def query(self, *, member: str | None = None, end_user: str | None = None,
              since: float | None = None, until: float | None = None,
              before_id: int | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first; ``before_id`` continues a page (the last ``id`` seen).

        ``end_user`` matches the raw ``user`` field or the HMAC upstream saw for it, so a
        provider's abuse report maps back to the member and end user.
        """
        where: list[str] = []
        args: list[object] = []
        for clause, value in (("member = ?", member),
                              ("(end_user = ? OR end_user_hash = ?)", end_user),
                              ("ts >= ?", since), ("ts < ?", until), ("id < ?", before_id)):
            if value is not None:
                where.append(clause)
                args.extend([value] * clause.count("?"))
        sql = "SELECT id, " + ", ".join(_COLUMNS) + " FROM audit"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        cur = self._db.execute(sql, args)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def purge(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        self._purged_at = now
        cutoff = now - self.retention_days * 86400
        return self._db.execute("DELETE FROM audit WHERE ts < ?", (cutoff,)).rowcount

    def close(self) -> None:
        self._writes.flush()
        self._db.close()
