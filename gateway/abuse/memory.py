"""The abuse windows of one gateway process (``state.kind: sqlite``), in memory."""

from __future__ import annotations

import time
from collections import OrderedDict, defaultdict, deque

from gateway.abuse import MAX_TRACKED_END_USERS, OnSuspicion, Suspicion
from gateway.config import AbuseConfig


class AbuseMonitor:
    """:class:`gateway.abuse.Abuse` for one process: O(1) per observation, bounded
    state per member."""

    def __init__(self, config: AbuseConfig) -> None:
        self._cfg = config
        # member -> end user -> when last seen, oldest sighting first
        self._end_users: dict[str, OrderedDict[str, float]] = defaultdict(OrderedDict)
        # member -> the times of the last ``limit_hits`` limit hits
        self._limit_hits: dict[str, deque[float]] = defaultdict(
            lambda: deque(maxlen=max(1, config.limit_hits)))
        self._raised: dict[tuple[str, str], float] = {}

    def _raise_once(self, member: str, reason: str, count: int, now: float
                    ) -> Suspicion | None:
        last = self._raised.get((member, reason))
        if last is not None and now - last < self._cfg.window_seconds:
            return None
        self._raised[(member, reason)] = now
        return Suspicion(member, reason, count, self._cfg.window_seconds)

    def _distinct_end_users(self, member: str, end_user: str, now: float) -> int:
        seen = self._end_users[member]
        seen.pop(end_user, None)
        seen[end_user] = now
        cutoff = now - self._cfg.window_seconds
        while seen and (len(seen) > MAX_TRACKED_END_USERS
                        or next(iter(seen.values())) < cutoff):
            seen.popitem(last=False)
        return len(seen)

    def _recent_limit_hits(self, member: str, now: float) -> int:
        hits = self._limit_hits[member]
        hits.append(now)
        cutoff = now - self._cfg.window_seconds
        while hits and hits[0] < cutoff:
            hits.popleft()
        return len(hits)

    def observe(self, member: str | None, end_user: str | None, limit_hit: bool,
                now: float | None = None) -> list[Suspicion]:
        if member is None:
            return []
        now = now or time.time()
        found: list[Suspicion] = []
        if end_user is not None:
            distinct = self._distinct_end_users(member, end_user, now)
            if distinct >= self._cfg.distinct_end_users:
                s = self._raise_once(member, "many_end_users", distinct, now)
                if s:
                    found.append(s)
        if limit_hit:
            hits = self._recent_limit_hits(member, now)
            if hits >= self._cfg.limit_hits:
                s = self._raise_once(member, "repeated_limit_hits", hits, now)
                if s:
                    found.append(s)
        return found

    def report(self, member: str | None, end_user: str | None, limit_hit: bool,
               on_suspicion: OnSuspicion) -> None:
        for suspicion in self.observe(member, end_user, limit_hit):
            on_suspicion(suspicion)

    async def close(self) -> None:
        return None
