"""Group commit: one transaction per loop turn, each caller waits for its own commit."""

from __future__ import annotations

import asyncio
import os
import select
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.sqlite import GroupCommit, SoleWriter, StateInUse, open_db


def _db(tmp_path: Path) -> tuple[sqlite3.Connection, list[str]]:
    db = open_db(tmp_path / "t.sqlite3")
    db.execute("CREATE TABLE t (v INTEGER UNIQUE)")
    statements: list[str] = []
    db.set_trace_callback(statements.append)
    return db, statements


def _rows(path: Path) -> list[int]:
    with sqlite3.connect(path) as other:  # another connection sees only what committed
        return sorted(v for (v,) in other.execute("SELECT v FROM t"))


async def test_writes_of_one_loop_turn_share_one_commit(tmp_path: Path) -> None:
    db, statements = _db(tmp_path)
    writes = GroupCommit(db)

    async def insert(v: int) -> None:
        await writes.submit(lambda d: d.execute("INSERT INTO t VALUES (?)", (v,)))
        assert v in _rows(tmp_path / "t.sqlite3")  # committed before the caller goes on

    await asyncio.gather(*(insert(v) for v in range(20)))
    assert statements.count("COMMIT") == 1
    assert _rows(tmp_path / "t.sqlite3") == list(range(20))



async def test_a_locked_file_fails_every_write_at_once(tmp_path: Path) -> None:
    """Another process holding the write lock (an admin's shell): the queued writes fail
    together after one busy wait. Retrying each alone waited once per write, with the
    event loop (and every request) held meanwhile."""
    db, statements = _db(tmp_path)
    writes = GroupCommit(db)
    other = sqlite3.connect(tmp_path / "t.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        results = await asyncio.gather(
            *(writes.submit(lambda d, v=v: d.execute("INSERT INTO t VALUES (?)", (v,)))
              for v in range(5)), return_exceptions=True)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert all(isinstance(r, sqlite3.OperationalError) for r in results), results
    assert "database is locked" in str(results[0])
    assert statements.count("BEGIN IMMEDIATE") == 1
    await writes.submit(lambda d: d.execute("INSERT INTO t VALUES (7)"))  # free again
    assert _rows(tmp_path / "t.sqlite3") == [7]

async def test_a_failing_write_fails_only_its_caller(tmp_path: Path) -> None:
    db, _ = _db(tmp_path)
    writes = GroupCommit(db)
    committed: list[int] = []

    def insert(v: int) -> asyncio.Future[None]:
        return writes.submit(lambda d: d.execute("INSERT INTO t VALUES (?)", (v,)),
                             lambda: committed.append(v))

    results = await asyncio.gather(insert(1), insert(2), insert(1), insert(3),
                                   return_exceptions=True)
    assert [type(r) for r in results] == [type(None), type(None), sqlite3.IntegrityError,
                                          type(None)]
    assert committed == [1, 2, 3]
    assert _rows(tmp_path / "t.sqlite3") == [1, 2, 3]


async def test_a_cancelled_caller_still_has_its_write_committed(tmp_path: Path) -> None:
    db, _ = _db(tmp_path)
    writes = GroupCommit(db)
    committed: list[int] = []
    gave_up = writes.submit(lambda d: d.execute("INSERT INTO t VALUES (7)"),
                            lambda: committed.append(7))
    gave_up.cancel()  # the caller went away before the commit
    await writes.submit(lambda d: d.execute("INSERT INTO t VALUES (8)"))
    assert gave_up.cancelled() and committed == [7]
    assert _rows(tmp_path / "t.sqlite3") == [7, 8]


def test_one_sole_writer_per_file_until_released(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    first = SoleWriter(path)
    with pytest.raises(StateInUse, match=rf"pid {os.getpid()}\)"):
        SoleWriter(path)
    SoleWriter(tmp_path / "other.sqlite3").release()  # another file is another claim
    first.release()
    SoleWriter(path).release()


def test_the_claim_of_a_killed_process_is_gone_at_once(tmp_path: Path) -> None:
    """kill -9 then restart must just work: the kernel drops a dead process's flock."""
    path = tmp_path / "state.sqlite3"
    with subprocess.Popen(
            [sys.executable, "-c", "import sys; from gateway.sqlite import SoleWriter; "
             f"SoleWriter({str(path)!r}); print('held', flush=True); sys.stdin.read()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout is not None
            ready, _, _ = select.select([holder.stdout], [], [], 60)  # a deadline, no sleep
            assert ready and holder.stdout.readline() == "held\n"
            with pytest.raises(StateInUse, match=rf"pid {holder.pid}\)"):
                SoleWriter(path)
        finally:
            holder.kill()
            holder.wait(30)
    SoleWriter(path).release()


def test_a_sole_connection_gives_the_file_up_when_closed(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    db = open_db(path, sole_writer=True)
    with pytest.raises(StateInUse):
        open_db(path, sole_writer=True)
    db.close()
    open_db(path, sole_writer=True).close()


def test_a_file_that_cannot_be_opened_leaves_no_claim_behind(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    path.write_bytes(b"not a database, " * 512)
    with pytest.raises(sqlite3.DatabaseError):
        open_db(path, sole_writer=True)
    SoleWriter(path).release()  # not StateInUse naming this very process
