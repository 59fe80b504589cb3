"""The shipper (gateway.audit.outbox) against a real SQLite outbox and real PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import pytest
from postgres_server import PostgresServer
from support import eventually

from gateway.audit import AuditRecord
from gateway.audit.outbox import Shipper
from gateway.audit.postgres import PostgresStore
from gateway.audit.sqlite import AuditLog


async def _count(dsn: str) -> tuple[int, int]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow("SELECT count(*), count(DISTINCT request_id) FROM audit")
        assert row is not None
        return int(row[0]), int(row[1])
    finally:
        await conn.close()


async def _fill(outbox: AuditLog, n: int, prefix: str = "req_") -> None:
    for i in range(n):
        await outbox.write(AuditRecord(f"{prefix}{i}", time.time(), "/v1/images/variations",
                                       member="alice", status=200, images_charged=1))


@pytest.fixture
def dsn(postgres_server: PostgresServer, request: pytest.FixtureRequest) -> str:
    return postgres_server.database("ship_" + request.node.name[5:40].lower())


async def test_batch_committed_but_not_acknowledged_ships_again_without_duplicates(
        dsn: str, tmp_path: Path) -> None:
    """The replica dies (or loses the answer) between PostgreSQL's commit and the outbox
    delete: the next round ships the same rows, and request_id keeps one of each."""
    outbox, store = AuditLog(tmp_path / "audit.sqlite3", 90), PostgresStore(dsn)
    shipper = Shipper(outbox, store, batch=4)
    try:
        await _fill(outbox, 10)

        def lost(first: int, last: int) -> None:
            raise OSError("killed before the acknowledgement")

        real_ack, outbox.acknowledge = outbox.acknowledge, lost  # type: ignore[method-assign]
        with pytest.raises(OSError):
            await shipper.ship_once()
        assert await _count(dsn) == (4, 4)  # committed in PostgreSQL ...
        assert outbox.backlog().records == 10  # ... and still in the outbox
        outbox.acknowledge = real_ack  # type: ignore[method-assign]
        assert await shipper.ship_once() == 4
        assert outbox.backlog().records == 6  # the id span of what is left, exact
        assert [await shipper.ship_once() for _ in range(3)] == [4, 2, 0]
        assert await _count(dsn) == (10, 10)
        assert outbox.backlog().records == 0
    finally:
        await store.close()
        outbox.close()


async def test_shipper_backs_off_while_postgres_is_away_and_catches_up(
        postgres_server: PostgresServer, tmp_path: Path) -> None:
    """Nothing is lost while the destination refuses connections; the waits between
    tries double up to the cap; once it is back every row arrives once."""
    dsn = postgres_server.dsn.rsplit("/", 1)[0] + "/catchup"
    closed = f"postgresql://postgres@127.0.0.1:{_closed_port()}/catchup"
    outbox = AuditLog(tmp_path / "audit.sqlite3", 90)
    waits: list[float] = []

    async def sleep(seconds: float) -> None:  # the injected clock: no real waiting
        waits.append(seconds)

    away = PostgresStore(closed, connect_timeout=2)
    shipper = Shipper(outbox, away, batch=3, backoff_initial=0.5, backoff_max=2.0,
                      sleep=sleep)
    task = asyncio.create_task(shipper.run())
    try:
        await _fill(outbox, 7)
        await eventually(lambda: len(waits) >= 5, "five failed tries")
        assert waits[:5] == [0.5, 1.0, 2.0, 2.0, 2.0]
        assert outbox.backlog().records == 7 and shipper.last_error is not None
    finally:
        task.cancel()
        await away.close()
    await _create_database(postgres_server, "catchup")
    store = PostgresStore(dsn)
    shipper = Shipper(outbox, store, batch=3)
    task = asyncio.create_task(shipper.run())
    try:
        await eventually(lambda: outbox.backlog().records == 0, "the outbox shipped")
        assert await _count(dsn) == (7, 7)
    finally:
        task.cancel()
        await store.close()
        outbox.close()


def _closed_port() -> int:
    from support import free_port

    return free_port()  # nothing listens there


async def _create_database(server: PostgresServer, name: str) -> None:
    conn = await asyncpg.connect(server.dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
