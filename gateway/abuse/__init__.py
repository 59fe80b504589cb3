"""Spotting abuse patterns per member, in a sliding window.

Two signals raise ``abuse_suspected``: one member's requests carrying many distinct
``user`` values (a shared token being resold or scripted), and one member hitting a
limit again and again. Raised at most once per window per member and signal, so a
flood does not flood the logs too.

Each observation costs O(1) and the state per member is bounded: a member sending
thousands of requests a second must not make every later request slower (keeping every
observation and counting distinct values per request once halved hit throughput within
seconds and kept falling for the whole window).

This package root holds the signals and the :class:`Abuse` protocol;
:mod:`gateway.abuse.memory` keeps the windows of one process, :mod:`gateway.abuse.redis`
one window per member across replicas.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

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
