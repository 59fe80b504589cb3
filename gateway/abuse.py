"""Spotting abuse patterns per member, in a sliding window.

Two signals raise ``abuse_suspected``: one member's requests carrying many distinct
``user`` values (a shared token being resold or scripted), and one member hitting a
limit again and again. Raised at most once per window per member and signal, so a
flood does not flood the logs too.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from dataclasses import dataclass

from gateway.config import AbuseConfig


@dataclass(frozen=True)
class Suspicion:
    member: str
    reason: str  # "many_end_users" | "repeated_limit_hits"
    count: int
    window_seconds: int


class AbuseMonitor:
    def __init__(self, config: AbuseConfig) -> None:
        self._cfg = config
        self._end_users: dict[str, deque[tuple[float, str]]] = defaultdict(deque)
        self._limit_hits: dict[str, deque[float]] = defaultdict(deque)
        self._raised: dict[tuple[str, str], float] = {}

    def _prune(self, q: deque, now: float) -> None:  # type: ignore[type-arg]
        cutoff = now - self._cfg.window_seconds
        while q and (q[0][0] if isinstance(q[0], tuple) else q[0]) < cutoff:
            q.popleft()

    def _raise_once(self, member: str, reason: str, count: int, now: float
                    ) -> Suspicion | None:
        last = self._raised.get((member, reason))
        if last is not None and now - last < self._cfg.window_seconds:
            return None
        self._raised[(member, reason)] = now
        return Suspicion(member, reason, count, self._cfg.window_seconds)

    def observe(self, member: str | None, end_user: str | None, limit_hit: bool,
                now: float | None = None) -> list[Suspicion]:
        if member is None:
            return []
        now = now or time.time()
        found: list[Suspicion] = []
        if end_user is not None:
            q = self._end_users[member]
            q.append((now, end_user))
            self._prune(q, now)
            distinct = len({u for _, u in q})
            if distinct >= self._cfg.distinct_end_users:
                s = self._raise_once(member, "many_end_users", distinct, now)
                if s:
                    found.append(s)
        if limit_hit:
            hits = self._limit_hits[member]
            hits.append(now)
            self._prune(hits, now)
            if len(hits) >= self._cfg.limit_hits:
                s = self._raise_once(member, "repeated_limit_hits", len(hits), now)
                if s:
                    found.append(s)
        return found
