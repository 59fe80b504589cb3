"""The abuse windows every replica shares, in Redis."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.abuse import MAX_TRACKED_END_USERS, OnSuspicion, Suspicion
from gateway.config import AbuseConfig
from gateway.errors import StorageUnavailable
from gateway.redis.client import PREFIX, Guarded, log, lua, text

KEYS = PREFIX + "{a}:"


class RedisAbuseMonitor(Guarded):
    """:class:`gateway.abuse.Abuse` with the windows in Redis: every replica's requests
    count towards one window per member, and a signal is raised once across replicas.

    The script runs in a task of its own after the answer: a request with a ``user``
    field or a limit hit costs the client no Redis round trip. If Redis is away, the
    observation is lost (logged by :meth:`_do`); nothing else is.
    """

    def __init__(self, client: Any, timeout: float, config: AbuseConfig) -> None:
        super().__init__(client, timeout)
        self._cfg = config
        self._script = client.register_script(lua("now", "abuse"))
        self._tasks: set[asyncio.Task[None]] = set()

    def report(self, member: str | None, end_user: str | None, limit_hit: bool,
               on_suspicion: OnSuspicion) -> None:
        if member is None or (end_user is None and not limit_hit):
            return
        task = asyncio.get_running_loop().create_task(
            self._report(member, end_user, limit_hit, on_suspicion))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _report(self, member: str, end_user: str | None, limit_hit: bool,
                      on_suspicion: OnSuspicion) -> None:
        try:
            found = await self.observe(member, end_user, limit_hit)
        except StorageUnavailable:  # logged by _do; this observation is lost, nothing else
            return
        for suspicion in found:
            try:
                on_suspicion(suspicion)
            except Exception:  # a task's error would otherwise go unseen
                log.exception("abuse_report_failed", member=member)

    async def observe(self, member: str, end_user: str | None, limit_hit: bool
                      ) -> list[Suspicion]:
        """Record one request now; the signals it raises across replicas."""
        base = KEYS + member.encode("utf-8").hex() + ":"
        found = await self._do(self._script(
            keys=[base + "users", base + "hits", base + "raised:many_end_users",
                  base + "raised:repeated_limit_hits"],
            args=[self._cfg.window_seconds, end_user or "", int(limit_hit),
                  self._cfg.distinct_end_users, self._cfg.limit_hits,
                  MAX_TRACKED_END_USERS]))
        return [Suspicion(member, text(found[i]), int(found[i + 1]), self._cfg.window_seconds)
                for i in range(0, len(found), 2)]

    async def close(self) -> None:
        if self._tasks:  # observations still on their way: let them land
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await super().close()
