"""The authenticator's table (gateway/auth.py): store reads applied in order."""

from __future__ import annotations

import asyncio
from pathlib import Path

from support import base_config, eventually

from gateway.auth import Authenticator
from gateway.config import build_config
from gateway.members import Members, Snapshot
from gateway.members.sqlite import SqliteMembers


class SlowFirstRead(SqliteMembers):
    """The first load reads, then is held (a Redis answer delayed on its connection)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = asyncio.Event()
        self.held = False

    async def load(self) -> Snapshot:
        snap = await super().load()
        if not self.held:
            self.held = True
            await self.gate.wait()
        return snap


async def test_overlapping_refreshes_leave_the_newest_read(tmp_path: Path) -> None:
    store = SlowFirstRead(tmp_path / "state.sqlite3")
    members = Members(store)
    auth = Authenticator(build_config(base_config(tmp_path)), members)
    first = asyncio.create_task(auth.refresh())  # reads an empty store, then held
    await eventually(lambda: store.held, "the first read held")
    await members.create("carol", {}, None)
    asyncio.get_running_loop().call_soon(store.gate.set)  # once this one yields, if ever
    await auth.refresh()  # reads carol
    await first
    assert "carol" in [p.name for p in auth.principals()]
    await store.close()
