"""The member store of one gateway process, in the state SQLite file beside the ledger.

This process is the file's only writer (the quota store claims it), so a change made
here is the only change there is: :meth:`SqliteMembers.watch` has nothing to hear, and
the admin API refreshes the authenticator itself after each change.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from gateway.members import Member, Snapshot
from gateway.sqlite import failures_translated, open_db

_SCHEMA = """
CREATE TABLE IF NOT EXISTS members (name TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS revoked_tokens (sha256 TEXT PRIMARY KEY);
"""


class SqliteMembers:
    """:class:`gateway.members.MemberStore` in SQLite: one JSON record per member."""

    def __init__(self, path: str | Path) -> None:
        # A second connection to the state file: the quota store holds the writer claim.
        self._db = open_db(path, cache_kib=128)
        self._db.executescript(_SCHEMA)

    async def load(self) -> Snapshot:
        with failures_translated():
            members = {name: Member.from_json(record) for name, record in
                       self._db.execute("SELECT name, record FROM members")}
            revoked = frozenset(d for (d,) in self._db.execute(
                "SELECT sha256 FROM revoked_tokens"))
        return Snapshot(members, revoked)

    async def swap(self, name: str, old: Member | None, new: Member | None,
                   revoked: Sequence[str] = ()) -> bool:
        # One transaction, run without an await on the event-loop thread: atomic here.
        with failures_translated():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT record FROM members WHERE name = ?",
                                       (name,)).fetchone()
                current = Member.from_json(row[0]) if row else None
                if current != old:
                    self._db.execute("ROLLBACK")
                    return False
                if new is None:
                    self._db.execute("DELETE FROM members WHERE name = ?", (name,))
                else:
                    self._db.execute("INSERT OR REPLACE INTO members VALUES (?, ?)",
                                     (name, new.to_json()))
                self._db.executemany("INSERT OR IGNORE INTO revoked_tokens VALUES (?)",
                                     [(d,) for d in revoked])
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        return True

    async def watch(self, changed: Callable[[], Awaitable[None]]) -> None:
        await asyncio.Event().wait()  # one process: every change is made here

    async def close(self) -> None:
        self._db.close()
