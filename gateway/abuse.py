"""Spotting abuse patterns per member, in a sliding window.

Two signals raise ``abuse_suspected``: one member's requests carrying many distinct
``user`` values (a shared token being resold or scripted), and one member hitting a
limit again and again. Raised at most once per window per member and signal, so a
flood does not flood the logs too.

Each observation costs O(1) and the state per member is bounded: a member sending
thousands of requests a second must not make every later request slower (keeping every
observation and counting distinct values per request once halved hit throughput within
seconds and kept falling for the whole window).
"""

from __future__ import annotations

import time
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.config import AbuseConfig

# Distinct ``user`` values remembered per member (the most recently seen): enough to
# count far past any sensible threshold, while a flood of unique values stays bounded.
MAX_TRACKED_END_USERS = 10_000


@dataclass(frozen=True)
class Suspicion:
    member: str
    reason: str  # "many_end_users" | "repeated_limit_hits"
    count: int
    window_seconds: int


OnSuspicion = Callable[[Suspicion], None]


class Abuse(Protocol):
    """Where the windows live: this process (one box), or Redis (every replica's
    requests in one window, so N replicas do not each see a fraction of a member)."""

    def report(self, member: str | None, end_user: str | None, limit_hit: bool,
               on_suspicion: OnSuspicion) -> None:
        """Record one request; call ``on_suspicion`` for each signal it raises (at once,
        or later: never on the answer's path)."""
        ...

    async def close(self) -> None: ...


class AbuseMonitor:
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
