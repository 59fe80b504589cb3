"""The config and router a request runs with, swapped whole by a reload (SIGHUP).

aiohttp freezes the application once it starts, and a request must never mix an old
config with a new one (priced by one, routed by the other). So each request takes one
:class:`Snapshot` at its start (the middleware in :mod:`gateway.app`) and uses it to the
end; a reload builds the next snapshot beside the running one and swaps it in with one
assignment. A backend the new snapshot no longer uses is closed only when the last
request holding a snapshot that uses it has finished: nothing in flight is cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import structlog

from gateway.backends.base import Backend
from gateway.config import Config
from gateway.router import Router

log = structlog.get_logger("gateway.live")


@dataclass(frozen=True, eq=False)  # one snapshot is itself: held and retired by identity
class Snapshot:
    """One config with the router built for it. ``sha256`` is of the config file's bytes
    (None for the built-in defaults or a config built in-process); ``loaded_at`` is Unix
    time; ``generation`` counts the reloads applied before it."""

    config: Config
    router: Router
    loaded_at: float
    sha256: str | None = None
    generation: int = 0


class Live:
    """Holds the current :class:`Snapshot`, counts the requests holding each one, and
    closes retired backends once nothing holds them."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._current = snapshot
        self._holders: dict[Snapshot, int] = {}  # snapshot -> requests holding it
        self._retired: list[Snapshot] = []  # replaced, but still held by requests
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def current(self) -> Snapshot:
        return self._current

    @property
    def draining(self) -> int:
        """Replaced snapshots that requests still hold."""
        return len(self._retired)

    @contextlib.contextmanager
    def hold(self) -> Iterator[Snapshot]:
        """The current snapshot, held until the block exits (one request's lifetime)."""
        snapshot = self._current
        self._holders[snapshot] = self._holders.get(snapshot, 0) + 1
        try:
            yield snapshot
        finally:
            left = self._holders.pop(snapshot) - 1
            if left:
                self._holders[snapshot] = left
            elif snapshot in self._retired:
                self._retired.remove(snapshot)
                self._close_later(self._unused(snapshot))

    async def swap(self, snapshot: Snapshot) -> None:
        """Make ``snapshot`` (its router started) the one new requests take."""
        old, self._current = self._current, snapshot
        await old.router.retire(snapshot.router)
        if old in self._holders:
            self._retired.append(old)
        else:
            await _close(self._unused(old))

    def _unused(self, snapshot: Snapshot) -> list[Backend]:
        """``snapshot``'s backends that neither the current nor a held snapshot uses."""
        in_use = {id(b) for s in (self._current, *self._retired)
                  for b in s.router.backends.values()}
        return [b for b in snapshot.router.backends.values() if id(b) not in in_use]

    def _close_later(self, backends: list[Backend]) -> None:
        if backends:
            task = asyncio.get_running_loop().create_task(_close(backends))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """At shutdown: every backend of every snapshot, once."""
        await asyncio.gather(*self._closing, return_exceptions=True)
        current = {id(b) for b in self._current.router.backends.values()}
        leftover = {id(b): b for s in self._retired for b in s.router.backends.values()
                    if id(b) not in current}
        self._retired = []
        await self._current.router.close()
        await _close(list(leftover.values()))


async def _close(backends: list[Backend]) -> None:
    for backend in backends:
        try:
            await backend.close()
        except Exception:  # one backend's failure must not keep the others open
            log.exception("backend_close_failed", backend=backend.name)
        else:
            log.info("backend_retired", backend=backend.name)
