"""``audit.kind: postgres``: one audit trail in PostgreSQL for every replica (asyncpg).

Each replica commits a record to its local SQLite outbox before answering (exactly as
``kind: sqlite`` does) and ships it from there (:class:`gateway.audit.outbox.Shipper`):
PostgreSQL slow or down delays the team's view, never an answer. ``request_id`` is the
unique key, so a batch shipped twice is stored once. ``/admin/audit``, ``/admin/usage``
and ``/admin/usage.csv`` read PostgreSQL: the whole team, on any replica.

The schema is created and migrated at the first connection, under an advisory lock (two
replicas starting together): a ``schema_version`` table, and every
:class:`~gateway.audit.AuditRecord` field as a column (``ADD COLUMN IF NOT EXISTS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any, TypeAlias

import asyncpg
import structlog
from asyncpg.pool import PoolConnectionProxy

from gateway import audit
from gateway.audit import COLUMNS, NAMES, AuditRecord, MemberUsage, OutboxStats
from gateway.audit.outbox import Shipper
from gateway.audit.sqlite import AuditLog
from gateway.config.dsn import secrets as dsn_secrets
from gateway.config.dsn import to_url
from gateway.errors import ApiError

log = structlog.get_logger("gateway.audit")
Connection: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"
_TYPES = {"integer": "bigint", "real": "double precision", "text": "text",
          "boolean": "boolean"}
_MIGRATION_LOCK = 0x7667_6175_6469_74  # pg_advisory_xact_lock key: "vgaudit"


def _schema_sql() -> list[str]:
    other = [n for n in NAMES if n != "request_id"]
    sql = ["CREATE TABLE IF NOT EXISTS schema_version "
           "(component text PRIMARY KEY, version integer NOT NULL)",
           "CREATE TABLE IF NOT EXISTS audit (id bigserial PRIMARY KEY, "
           "request_id text NOT NULL UNIQUE)"]
    sql += [f"ALTER TABLE audit ADD COLUMN IF NOT EXISTS {n} {_TYPES[COLUMNS[n]]}"
            for n in other]
    sql += ["CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts)",
            "CREATE INDEX IF NOT EXISTS audit_member_id ON audit (member, id)",
            "CREATE INDEX IF NOT EXISTS audit_end_user_id ON audit (end_user, id)",
            "CREATE INDEX IF NOT EXISTS audit_end_user_hash_id ON audit (end_user_hash, id)",
            # Admin actions are a handful among millions of requests: a partial index.
            "CREATE INDEX IF NOT EXISTS audit_action_id ON audit (action, id) "
            "WHERE action IS NOT NULL",
            "CREATE INDEX IF NOT EXISTS audit_target_id ON audit (target, id) "
            "WHERE target IS NOT NULL"]
    return sql


async def migrate(conn: Connection) -> None:
    """Create or bring the schema up to this gateway's fields and version."""
    async with conn.transaction():
        await conn.execute(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
        for statement in _schema_sql():
            await conn.execute(statement)
        found = await conn.fetchval(
            "SELECT version FROM schema_version WHERE component = 'audit'")
        if found is None or found < audit.SCHEMA_VERSION:
            await conn.execute(
                "INSERT INTO schema_version VALUES ('audit', $1) ON CONFLICT (component) "
                "DO UPDATE SET version = excluded.version", audit.SCHEMA_VERSION)
        elif found > audit.SCHEMA_VERSION:
            log.warning("audit_schema_newer", version=found, ours=audit.SCHEMA_VERSION)


def _row(values: Sequence[object]) -> tuple[object, ...]:
    return tuple(audit.coerce(COLUMNS[n], v) for n, v in zip(NAMES, values, strict=True))


class PostgresStore:
    """The shared audit table: the shipper's sink and the admin API's source."""

    def __init__(self, dsn: str, *, connect_timeout: float = 5.0,
                 command_timeout: float = 10.0) -> None:
        self._dsn = dsn
        self._secrets = dsn_secrets(dsn)
        self._timeouts = connect_timeout, command_timeout
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()
        self._insert = (f"INSERT INTO audit ({', '.join(NAMES)}) VALUES "
                        f"({', '.join(f'${i}' for i in range(1, len(NAMES) + 1))}) "
                        "ON CONFLICT (request_id) DO NOTHING")

    def describe(self, exc: BaseException) -> str:
        """``exc``'s message for a log line, never the DSN's password. A server's or the
        network's message is kept, with the password masked should it repeat it; any other
        (a DSN the driver could not parse quotes pieces of it) is only its class."""
        known = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
        if not isinstance(exc, known) or isinstance(exc, ValueError):
            return f"{type(exc).__name__} (message withheld: it may quote the DSN)"
        text = str(exc) or type(exc).__name__
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        async with self._lock:
            if self._pool is None:
                connect, command = self._timeouts
                pool = await asyncpg.create_pool(to_url(self._dsn), min_size=0, max_size=4,
                                                 timeout=connect, command_timeout=command)
                try:
                    async with pool.acquire() as conn:
                        await migrate(conn)
                except BaseException:
                    await pool.close()
                    raise
                self._pool = pool
            pool = self._pool
        async with pool.acquire() as conn:
            yield conn

    async def insert(self, rows: Sequence[tuple[object, ...]]) -> None:
        async with self.connection() as conn, conn.transaction():
            await conn.executemany(self._insert, [_row(r) for r in rows])

    async def search(self, *, member: str | None = None, end_user: str | None = None,
                     action: str | None = None, target: str | None = None,
                     since: float | None = None, until: float | None = None,
                     before_id: int | None = None, limit: int = 100
                     ) -> list[dict[str, Any]]:
        common = [("member", "=", member), ("action", "=", action), ("target", "=", target),
                  ("ts", ">=", since), ("ts", "<", until), ("id", "<", before_id)]
        if end_user is None:
            return await self._select(common, limit)
        rows = {r["id"]: r for column in ("end_user", "end_user_hash")
                for r in await self._select([(column, "=", end_user), *common], limit)}
        return [rows[i] for i in sorted(rows, reverse=True)[:limit]]

    async def _select(self, conditions: Sequence[tuple[str, str, object]], limit: int
                      ) -> list[dict[str, Any]]:
        used = [(c, op, v) for c, op, v in conditions if v is not None]
        where = " AND ".join(f"{c} {op} ${i}" for i, (c, op, _) in enumerate(used, 1))
        sql = (f"SELECT id, {', '.join(NAMES)} FROM audit"
               + (f" WHERE {where}" if where else "")
               + f" ORDER BY id DESC LIMIT ${len(used) + 1}")
        async with self.connection() as conn:
            records = await conn.fetch(sql, *(v for _, _, v in used), limit)
        return [dict(r) for r in records]

    async def member_usage(self, start: float, end: float) -> dict[str, MemberUsage]:
        async with self.connection() as conn:
            rows = await conn.fetch(audit.usage_sql(lambda i: f"${i}"), start, end)
        return audit.usage_from_rows(tuple(r) for r in rows)

    async def team_usage(self, now: float) -> dict[str, dict[str, float]]:
        """``/admin/usage``'s figures (UTC day and month, as the ledger keeps them)."""
        day = now // 86400 * 86400
        month = datetime.fromtimestamp(now, UTC).replace(
            day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()
        today, this_month = await asyncio.gather(self.member_usage(day, now + 1),
                                                 self.member_usage(month, now + 1))
        return {name: {"images_today": today.get(name, MemberUsage()).images,
                       "images_this_month": u.images,
                       "requests_today": today.get(name, MemberUsage()).requests,
                       "cache_hits_today": today.get(name, MemberUsage()).cache_hits,
                       "spend_usd_this_month": u.spend_usd}
                for name, u in this_month.items()}

    async def purge_batch(self, retention_days: int, now: float | None = None) -> int:
        cutoff = (time.time() if now is None else now) - retention_days * 86400
        async with self.connection() as conn:
            status = await conn.execute(
                "DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE ts < $1 "
                "LIMIT $2)", cutoff, audit.PURGE_BATCH)
        return int(status.split()[-1])

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


def unavailable(store: PostgresStore, exc: Exception) -> ApiError:
    log.warning("audit_read_failed", error=type(exc).__name__, detail=store.describe(exc))
    return ApiError(503, "The team's audit database (PostgreSQL) is unavailable; retry "
                    "shortly.", code="audit_unavailable", should_retry=True)


class PostgresAudit:
    """The audit trail of ``kind: postgres``: a SQLite outbox, a shipper, PostgreSQL."""

    def __init__(self, outbox: AuditLog, store: PostgresStore, retention_days: int,
                 shipper: Shipper | None = None) -> None:
        self.outbox, self.store = outbox, store
        self.retention_days = retention_days
        self.shipper = shipper or Shipper(outbox, store, describe=store.describe)

    def write(self, record: AuditRecord) -> asyncio.Future[None]:
        done = self.outbox.write(record)
        done.add_done_callback(lambda _: self.shipper.wake())
        return done

    async def search(self, *, member: str | None = None, end_user: str | None = None,
                     action: str | None = None, target: str | None = None,
                     since: float | None = None, until: float | None = None,
                     before_id: int | None = None, limit: int = 100
                     ) -> list[dict[str, Any]]:
        try:
            return await self.store.search(member=member, end_user=end_user, action=action,
                                           target=target, since=since, until=until,
                                           before_id=before_id, limit=limit)
        except Exception as exc:  # PostgreSQL away, slow or failing: a 503, never a 500
            raise unavailable(self.store, exc) from None

    async def member_usage(self, start: float, end: float) -> dict[str, MemberUsage]:
        try:
            return await self.store.member_usage(start, end)
        except Exception as exc:  # PostgreSQL away, slow or failing: a 503, never a 500
            raise unavailable(self.store, exc) from None

    async def team_usage(self, now: float) -> dict[str, dict[str, float]] | None:
        """The team's rows, or None while PostgreSQL is away: the ledger answers then."""
        try:
            return await self.store.team_usage(now)
        except Exception as exc:
            log.warning("audit_usage_from_ledger", error=type(exc).__name__,
                        detail=self.store.describe(exc))
            return None

    def outbox_stats(self) -> OutboxStats:
        return self.outbox.backlog()

    def status(self) -> dict[str, object]:
        error = self.shipper.last_error
        return {"kind": "postgres", "outbox_records": self.outbox.backlog().records,
                # Unauthenticated (/readyz): the failure's class only, as checks.state.
                "shipping": "ok" if error is None else f"retrying: {self.shipper.failure}"}

    async def run(self) -> None:
        await asyncio.gather(self.shipper.run(), self._keep_retention())

    async def _keep_retention(self) -> None:
        """Every replica purges a batch at a time; two at once only wait for each other."""
        while True:
            try:
                deleted = await self.store.purge_batch(self.retention_days)
            except Exception as exc:  # PostgreSQL away: the next round
                log.warning("audit_purge_failed", error=type(exc).__name__,
                            detail=self.store.describe(exc))
                deleted = 0
            await asyncio.sleep(0 if deleted >= audit.PURGE_BATCH
                                else audit.PURGE_EVERY_SECONDS)

    async def aclose(self) -> None:
        """Commit what is queued, ship what can be shipped in a few seconds (not when
        PostgreSQL is known to be away: the next start ships it), close."""
        self.outbox.flush()
        if self.shipper.last_error is None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._drain(), 5.0)
        await self.store.close()
        self.outbox.close()

    async def _drain(self) -> None:
        while await self.shipper.ship_once():
            pass
