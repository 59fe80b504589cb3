"""Redis clients, the guard every call goes through, and the Lua scripts.

Why Lua: every check-and-take (admission, image reservation, commit, refund, cache
append and eviction) is one script, which Redis runs atomically, so N replicas can never
each see "one left" and together admit N. Scripts read the clock with ``TIME``, so the
sliding window and leases do not depend on the replicas' clocks agreeing. They live in
``scripts/*.lua`` beside this module (package data, so a wheel carries them).

Why fail closed: a Redis error, or a call slower than ``state.timeout_seconds``, becomes
:class:`gateway.errors.StorageUnavailable` (``503 state_unavailable`` with
``retry-after``); nothing is admitted on an error. The clients reconnect on their own,
so service resumes when Redis is back.

Keys carry hash tags (``{u:NAME}`` per user, ``{c}`` for the cache, ``{img}`` for
images, ``{a}`` for abuse) so every script's keys share one slot and Redis Cluster
works too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio as aredis
import structlog
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.errors import STATE_RETRY_AFTER_SECONDS, StorageUnavailable

log = structlog.get_logger("gateway.state")
T = TypeVar("T")
PREFIX = "vg:"
RETRY_AFTER_SECONDS = STATE_RETRY_AFTER_SECONDS
MAX_CONNECTIONS = 64  # per client and process
# What a Redis call fails with when Redis is away or slow.
FAILURES = (RedisError, OSError, TimeoutError)


def unavailable(exc: BaseException) -> StorageUnavailable:
    """The error a Redis store raises for ``exc`` (logged once, here)."""
    log.warning("state_unavailable", error=f"{type(exc).__name__}: {exc}")
    failure = StorageUnavailable(exc, shared=True)
    failure.__cause__ = exc
    return failure


@functools.cache
def lua(*names: str) -> str:
    """The script made of ``scripts/<name>.lua`` files, in order (libraries first)."""
    scripts = resources.files("gateway.redis") / "scripts"
    return "".join((scripts / f"{name}.lua").read_text("utf-8") for name in names)


def text(v: Any) -> str:
    """A Redis reply as text."""
    return v.decode() if isinstance(v, bytes) else str(v)


def limit_arg(v: float | None) -> float:
    """A limit as a script argument: -1 for none."""
    return -1 if v is None else v


# --------------------------------------------------------------------------- clients


@dataclass(frozen=True)
class _Flavour:
    """The classes of one redis-py flavour (asyncio or blocking)."""

    retry: Any
    cluster: Any
    sentinel: Any
    plain: Callable[[str, dict[str, Any]], Any]


def _async_plain(url: str, kw: dict[str, Any]) -> Any:
    # Blocking pool: a burst queues for a connection (bounded by the timeout) instead of
    # failing at once with "too many connections".
    pool = aredis.BlockingConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=kw["socket_timeout"], **kw)
    return aredis.Redis.from_pool(pool)


def _sync_plain(url: str, kw: dict[str, Any]) -> Any:
    return redis.Redis.from_url(url, **kw)


_ASYNC = _Flavour(aredis.retry.Retry, AsyncRedisCluster, AsyncSentinel, _async_plain)
_SYNC = _Flavour(redis.retry.Retry, redis.RedisCluster, redis.Sentinel, _sync_plain)


def _open(url: str, timeout: float, flavour: _Flavour) -> Any:
    # One immediate retry re-dials a connection that died with a Redis restart; more
    # would only stretch a request past its timeout.
    kw: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                          "health_check_interval": 0,
                          "retry": flavour.retry(NoBackoff(), 1)}
    scheme, _, rest = url.partition("://")
    if scheme.endswith("+cluster"):
        return flavour.cluster.from_url(f"{scheme.removesuffix('+cluster')}://{rest}",
                                        socket_timeout=timeout,
                                        socket_connect_timeout=timeout)
    if scheme.endswith("+sentinel"):
        hosts, service, db, password, ssl = _sentinel(url)
        sentinel = flavour.sentinel(hosts, socket_timeout=timeout, ssl=ssl)
        return sentinel.master_for(service, db=db, password=password, **kw)
    return flavour.plain(url, kw)


def connect(url: str, timeout: float) -> Any:
    """An asyncio client for ``url``: ``redis[s]://``, ``unix://``,
    ``redis[s]+cluster://host:port`` or ``redis[s]+sentinel://h1:p1,h2:p2/service[/db]``."""
    return _open(url, timeout, _ASYNC)


def connect_sync(url: str, timeout: float) -> Any:
    """The blocking twin of :func:`connect`, for start-up and executor threads."""
    return _open(url, timeout, _SYNC)


def _sentinel(url: str) -> tuple[list[tuple[str, int]], str, int, str | None, bool]:
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    hosts = []
    for hp in netloc.split(","):
        host, _, port = hp.partition(":")
        hosts.append((host, int(port or 26379)))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("a sentinel URL names the service: redis+sentinel://h:p/SERVICE")
    db = int(path[1]) if len(path) > 1 else 0
    password = unquote(parts.password) if parts.password else None
    return hosts, path[0], db, password, parts.scheme.startswith("rediss")


class Guarded:
    """An asyncio client whose calls are bounded by the timeout, Redis failures raised
    as :class:`StorageUnavailable`."""

    def __init__(self, client: Any, timeout: float) -> None:
        self.r = client
        self.timeout = timeout

    async def _do(self, aw: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self.timeout):
                return await aw
        except FAILURES as exc:
            raise unavailable(exc) from exc

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.r.aclose()
