"""The PostgreSQL audit table itself (issue 21): created and migrated in place by the
gateway at start, with a version table; retention applied there in batches."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable

from postgres_server import PostgresServer

from gateway.audit import NAMES, PURGE_BATCH, SCHEMA_VERSION, AuditRecord
from gateway.audit.postgres import PostgresStore

DAY = 86400.0


def row(request_id: str, ts: float) -> tuple[object, ...]:
    """One record as the outbox hands it to the shipper (the columns in NAMES order)."""
    record = dataclasses.asdict(AuditRecord(request_id, ts, "/v1/images/variations",
                                            member="alice", status=200))
    return tuple(record[name] for name in NAMES)


def with_store(dsn: str, use: Callable[[PostgresStore], Awaitable[None]]) -> None:
    """Run ``use`` on a store of its own loop (the server fixture's SQL runs its own)."""
    async def run() -> None:
        store = PostgresStore(dsn)
        try:
            await use(store)
        finally:
            await store.close()
    asyncio.run(run())


def columns(pg: PostgresServer, db: str) -> set[str]:
    return {str(r[0]) for r in pg.sql(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'audit'", db)}


def test_an_older_table_is_migrated_in_place_and_versioned(
        postgres_server: PostgresServer) -> None:
    dsn = postgres_server.database("vg_migrate")
    # The table as an earlier gateway made it: fewer columns, one record already in it.
    postgres_server.sql("CREATE TABLE audit (id bigserial PRIMARY KEY, request_id text NOT "
                        "NULL UNIQUE, ts double precision, route text, member text)",
                        "vg_migrate")
    postgres_server.sql("INSERT INTO audit (request_id, ts, route, member) VALUES "
                        "('req_old', 1, '/v1/images/variations', 'bob')", "vg_migrate")

    async def ship(store: PostgresStore) -> None:
        await store.insert([row("req_new", time.time())])
    with_store(dsn, ship)
    assert columns(postgres_server, "vg_migrate") >= {"id", *NAMES}
    assert postgres_server.sql("SELECT component, version FROM schema_version",
                               "vg_migrate") == [("audit", SCHEMA_VERSION)]
    assert postgres_server.sql("SELECT request_id, member FROM audit ORDER BY id",
                               "vg_migrate") == [("req_old", "bob"), ("req_new", "alice")]


def test_retention_deletes_only_expired_records_a_batch_at_a_time(
        postgres_server: PostgresServer) -> None:
    dsn = postgres_server.database("vg_retention")
    now = 1_800_000_000.0
    expired = [row(f"req_old_{i}", now - 31 * DAY - i) for i in range(PURGE_BATCH + 5)]
    kept = [row("req_recent", now - 29 * DAY)]

    async def purge(store: PostgresStore) -> None:
        await store.insert([*expired, *kept])
        assert await store.purge_batch(30, now) == PURGE_BATCH  # one bounded statement
        assert await store.purge_batch(30, now) == 5
        assert await store.purge_batch(30, now) == 0
    with_store(dsn, purge)
    assert postgres_server.sql("SELECT request_id FROM audit", "vg_retention") == [
        ("req_recent",)]


def test_admin_actions_are_searched_by_action_and_target(
        postgres_server: PostgresServer) -> None:
    """"Who revoked bob's tokens, and when": the filters /admin/audit passes through, on
    the partial index (admin actions are a handful among requests)."""
    dsn = postgres_server.database("vg_actions")

    def admin(request_id: str, ts: float, action: str, target: str) -> tuple[object, ...]:
        record = dataclasses.asdict(AuditRecord(request_id, ts, "/admin/users",
                                                member="admin:ops", status=200,
                                                action=action, target=target))
        return tuple(record[name] for name in NAMES)

    async def search(store: PostgresStore) -> None:
        await store.insert([row("req_plain", 10.0), admin("req_a", 11.0, "user.revoke", "bob"),
                            admin("req_b", 12.0, "user.create", "bob"),
                            admin("req_c", 13.0, "user.revoke", "carol"),
                            admin("req_d", 14.0, "user.revoke", "bob")])
        found = await store.search(action="user.revoke", target="bob")
        assert [r["request_id"] for r in found] == ["req_d", "req_a"]  # newest first
        assert [r["request_id"] for r in await store.search(target="bob")] == [
            "req_d", "req_b", "req_a"]
        assert [r["request_id"] for r in await store.search(action="user.revoke")] == [
            "req_d", "req_c", "req_a"]
        assert await store.search(action="user.revoke", target="dave") == []
    with_store(dsn, search)
    assert {r[0] for r in postgres_server.sql(
        "SELECT indexname FROM pg_indexes WHERE indexname IN ('audit_action_id', "
        "'audit_target_id')", "vg_actions")} == {"audit_action_id", "audit_target_id"}
