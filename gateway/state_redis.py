"""Shared state on Redis, so replicas behind a load balancer behave as one gateway.

Why Lua: every check-and-take (admission, image reservation, commit, refund, cache
append and eviction) is one script, which Redis runs atomically, so N replicas can never
each see "one left" and together admit N. Scripts read the clock with ``TIME``, so the
sliding window and leases do not depend on the replicas' clocks agreeing.

Why leases: a replica can die between reserve and commit. Reservations and in-flight
slots are recorded with an expiry (the longest a generation may take), so a crashed
replica's holds free themselves instead of eating a user's quota for the day.

Why fail closed: a Redis error, or a call slower than ``state.timeout_seconds``, becomes
``503 state_unavailable`` with ``retry-after``; nothing is admitted on an error. The
clients reconnect on their own, so service resumes when Redis is back.

Keys carry hash tags (``{u:NAME}`` per user, ``{c}`` for the cache, ``{img}`` for
images) so every script's keys share one slot and Redis Cluster works too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio as aredis
import structlog
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.abuse import MAX_TRACKED_END_USERS, OnSuspicion, Suspicion
from gateway.auth import Principal
from gateway.cache import BlobStore, Evicted, Item
from gateway.config import AbuseConfig
from gateway.errors import ApiError
from gateway.quota import (
    LimitStatus,
    QuotaRejected,
    Reservation,
    blocked_error,
    day_bounds,
    duration,
    month_bounds,
    ratelimit_headers,
    reservation_refusal,
)
from gateway.storage import ID_RE, ImageStore, atomic_write

log = structlog.get_logger("gateway.state")
T = TypeVar("T")
PREFIX = "vg:"
RETRY_AFTER_SECONDS = 2
MAX_CONNECTIONS = 64  # per client and process
DAY_KEY_TTL = 3 * 86400
MONTH_KEY_TTL = 400 * 86400
COMMIT_MARKER_TTL = 3600  # a commit sent twice (lost reply) is recognised for an hour


class StateUnavailable(ApiError):
    """The shared state store did not answer in time: refuse, never guess."""

    def __init__(self) -> None:
        super().__init__(503, "The gateway's state store (Redis) is unavailable; retry "
                         "shortly.", code="state_unavailable", should_retry=True,
                         headers={"retry-after": str(RETRY_AFTER_SECONDS)})


# --------------------------------------------------------------------------- clients


def _client_kwargs(timeout: float) -> dict[str, Any]:
    # One immediate retry re-dials a connection that died with a Redis restart; more
    # would only stretch a request past its timeout.
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout,
            "health_check_interval": 0}


def connect(url: str, timeout: float) -> Any:
    """An asyncio client for ``url``: ``redis[s]://``, ``unix://``,
    ``redis[s]+cluster://host:port`` or ``redis[s]+sentinel://h1:p1,h2:p2/service[/db]``."""
    kw = _client_kwargs(timeout)
    kw["retry"] = aredis.retry.Retry(NoBackoff(), 1)
    scheme, _, rest = url.partition("://")
    if scheme.endswith("+cluster"):
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(f"{scheme.removesuffix('+cluster')}://{rest}",
                                     socket_timeout=timeout,
                                     socket_connect_timeout=timeout)
    if scheme.endswith("+sentinel"):
        from redis.asyncio.sentinel import Sentinel

        hosts, service, db, password, ssl = _sentinel(url)
        sentinel = Sentinel(hosts, socket_timeout=timeout, ssl=ssl)
        return sentinel.master_for(service, db=db, password=password, **kw)
    # Blocking pool: a burst queues for a connection (bounded by the timeout) instead of
    # failing at once with "too many connections".
    pool = aredis.BlockingConnectionPool.from_url(url, max_connections=MAX_CONNECTIONS,
                                                  timeout=timeout, **kw)
    return aredis.Redis.from_pool(pool)


def connect_sync(url: str, timeout: float) -> Any:
    """The blocking twin of :func:`connect`, for start-up and executor threads."""
    kw = _client_kwargs(timeout)
    kw["retry"] = redis.retry.Retry(NoBackoff(), 1)
    scheme, _, rest = url.partition("://")
    if scheme.endswith("+cluster"):
        return redis.RedisCluster.from_url(f"{scheme.removesuffix('+cluster')}://{rest}",
                                           socket_timeout=timeout,
                                           socket_connect_timeout=timeout)
    if scheme.endswith("+sentinel"):
        hosts, service, db, password, ssl = _sentinel(url)
        sentinel = redis.Sentinel(hosts, socket_timeout=timeout, ssl=ssl)
        return sentinel.master_for(service, db=db, password=password, **kw)
    return redis.Redis.from_url(url, **kw)


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


class _Guarded:
    """Bounds every call by the timeout and turns Redis failures into a 503."""

    def __init__(self, client: Any, timeout: float) -> None:
        self.r = client
        self.timeout = timeout

    async def _do(self, aw: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self.timeout):
                return await aw
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("state_unavailable", error=f"{type(exc).__name__}: {exc}")
            raise StateUnavailable() from exc

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.r.aclose()


def _now_lua() -> str:
    return "local t = redis.call('TIME') local now = tonumber(t[1]) + tonumber(t[2]) / 1e6\n"


# --------------------------------------------------------------------------- quota

# Leases: ZSET id -> expiry, HASH id -> "images cost", HASH held {images, cost}.
_PRUNE = """
local function prune(held, leases, leasev, now)
  local dead = redis.call('ZRANGEBYSCORE', leases, '-inf', now)
  for _, id in ipairs(dead) do
    local v = redis.call('HGET', leasev, id)
    if v then
      local sp = string.find(v, ' ')
      redis.call('HINCRBY', held, 'images', -tonumber(string.sub(v, 1, sp - 1)))
      redis.call('HINCRBYFLOAT', held, 'cost', -tonumber(string.sub(v, sp + 1)))
      redis.call('HDEL', leasev, id)
    end
    redis.call('ZREM', leases, id)
  end
end
local function release(held, leases, leasev, id)
  local v = redis.call('HGET', leasev, id)
  if not v then return end
  local sp = string.find(v, ' ')
  local left = redis.call('HINCRBY', held, 'images', -tonumber(string.sub(v, 1, sp - 1)))
  if left <= 0 then redis.call('HSET', held, 'cost', 0) else
    redis.call('HINCRBYFLOAT', held, 'cost', -tonumber(string.sub(v, sp + 1))) end
  redis.call('HDEL', leasev, id)
  redis.call('ZREM', leases, id)
end
local function num(v) return tonumber(v or '0') or 0 end
"""

# KEYS: blocked, window, inflight. ARGV: rpm (-1 none), max_concurrent (-1), slot, lease.
_ADMIT = _now_lua() + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'blocked', '0'} end
local rpm, maxc, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 60)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if rpm >= 0 and redis.call('ZCARD', KEYS[2]) >= rpm then
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  local wait = 60
  if first[2] then wait = tonumber(first[2]) + 60 - now end
  return {'requests_per_minute', tostring(wait)}
end
if maxc >= 0 and redis.call('ZCARD', KEYS[3]) >= maxc then return {'max_concurrent', '1'} end
redis.call('ZADD', KEYS[2], now, ARGV[3])
redis.call('PEXPIRE', KEYS[2], 61000)
redis.call('ZADD', KEYS[3], now + lease, ARGV[3])
redis.call('PEXPIRE', KEYS[3], math.ceil(lease * 1000) + 1000)
return {'ok', '0'}
"""

# KEYS: day, month, held, leases, leasev.
# ARGV: images, cost, day limit, month limit, budget (-1 none), id, lease seconds.
_RESERVE = _PRUNE + _now_lua() + """
prune(KEYS[3], KEYS[4], KEYS[5], now)
local held = num(redis.call('HGET', KEYS[3], 'images'))
local held_cost = num(redis.call('HGET', KEYS[3], 'cost'))
local d = num(redis.call('HGET', KEYS[1], 'images'))
local m = num(redis.call('HGET', KEYS[2], 'images'))
local spend = num(redis.call('HGET', KEYS[2], 'spend'))
local images, cost = tonumber(ARGV[1]), tonumber(ARGV[2])
local ld, lm, lb = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if ld >= 0 and ld - (d + held) < images then return 'images_per_day' end
if lm >= 0 and lm - (m + held) < images then return 'images_per_month' end
if lb >= 0 and lb - (spend + held_cost) < cost - 1e-9 then return 'budget_usd_per_month' end
local lease = tonumber(ARGV[7])
redis.call('HINCRBY', KEYS[3], 'images', images)
redis.call('HINCRBYFLOAT', KEYS[3], 'cost', cost)
redis.call('HSET', KEYS[5], ARGV[6], ARGV[1] .. ' ' .. ARGV[2])
redis.call('ZADD', KEYS[4], now + lease, ARGV[6])
local ms = math.ceil(lease * 1000) + 60000
for i = 3, 5 do redis.call('PEXPIRE', KEYS[i], ms) end
return 'ok'
"""

# KEYS: day, month, held, leases, leasev, done marker.
# ARGV: id, images, cost, day ttl, month ttl, marker ttl.
# The marker makes a commit idempotent: one whose reply was lost can be sent again.
_COMMIT = _PRUNE + """
if not redis.call('SET', KEYS[6], '1', 'NX', 'EX', ARGV[6]) then return 'done' end
release(KEYS[3], KEYS[4], KEYS[5], ARGV[1])
local images = tonumber(ARGV[2])
if images > 0 then
  redis.call('HINCRBY', KEYS[1], 'images', images)
  redis.call('HINCRBYFLOAT', KEYS[1], 'spend', ARGV[3])
  redis.call('HINCRBY', KEYS[2], 'images', images)
  redis.call('HINCRBYFLOAT', KEYS[2], 'spend', ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
return 'ok'
"""

_REFUND = _PRUNE + "release(KEYS[1], KEYS[2], KEYS[3], ARGV[1]) return 'ok'"

# KEYS: day, month, held, leases, leasev, window, inflight.
_SNAPSHOT = _PRUNE + _now_lua() + """
prune(KEYS[3], KEYS[4], KEYS[5], now)
redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now - 60)
redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', now)
local first = redis.call('ZRANGE', KEYS[6], 0, 0, 'WITHSCORES')
return {tostring(now), redis.call('HGET', KEYS[1], 'images') or '0',
  redis.call('HGET', KEYS[2], 'images') or '0', redis.call('HGET', KEYS[2], 'spend') or '0',
  redis.call('HGET', KEYS[3], 'images') or '0', redis.call('HGET', KEYS[3], 'cost') or '0',
  tostring(redis.call('ZCARD', KEYS[6])), first[2] or '', tostring(redis.call('ZCARD', KEYS[7]))}
"""


def _lim(v: float | None) -> float:
    return -1 if v is None else v


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class _UserKeys:
    def __init__(self, user: str, now: float) -> None:
        self._tag = tag = f"{PREFIX}{{u:{user}}}:"
        day, _ = day_bounds(now)
        month, _ = month_bounds(now)
        self.day, self.month = tag + "ledger:" + day, tag + "ledger:" + month
        self.held, self.leases, self.leasev = tag + "held", tag + "leases", tag + "leasev"
        self.window, self.inflight, self.blocked = tag + "window", tag + "inflight", tag + "blocked"

    def committed(self, rid: str) -> str:
        return self._tag + "committed:" + rid

    @property
    def money(self) -> list[str]:
        return [self.day, self.month, self.held, self.leases, self.leasev]


class RedisQuota(_Guarded):
    """:class:`gateway.quota.QuotaStore` shared by every replica through Redis."""

    USERS = PREFIX + "users"

    def __init__(self, client: Any, timeout: float, lease_seconds: float,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(client, timeout)
        self.lease = lease_seconds
        # The wall clock (unix seconds) that picks ledger periods; tests inject their own.
        # Leases and the minute window run on Redis's own clock (TIME) in the scripts.
        self.clock = clock
        self._admit = client.register_script(_ADMIT)
        self._reserve = client.register_script(_RESERVE)
        self._commit = client.register_script(_COMMIT)
        self._refund = client.register_script(_REFUND)
        self._snapshot = client.register_script(_SNAPSHOT)
        self._pending: set[asyncio.Task[None]] = set()

    async def _release(self, make: Callable[[], Awaitable[object]]) -> None:
        """Run a release (refund, slot) now, or keep retrying in the background while
        Redis is away: held quota comes back soon after Redis does, not when the lease
        expires. Never raises: the request's own outcome must not be masked."""
        try:
            await self._do(make())
            return
        except StateUnavailable:
            pass
        loop = asyncio.get_running_loop()

        async def retry() -> None:
            deadline, delay = loop.time() + self.lease, 0.25
            while loop.time() < deadline:
                await asyncio.sleep(delay)  # backing off while Redis is down
                try:
                    await self._do(make())
                    return
                except StateUnavailable:
                    delay = min(delay * 2, 5.0)

        task = loop.create_task(retry())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _hand_back(self, make: Callable[[], Awaitable[object]]) -> None:
        """Undo a take in the background: one whose reply never came (a timeout, a
        dropped connection, or the client leaving while the script ran; the script may
        have run, and nothing else would give back what it took before its lease ends),
        or a refund nobody waits for. Undoing an id never taken is a no-op, so this is
        always safe. One try: if Redis is down it does not help to queue one retry per
        request, and the lease still ends the hold."""

        async def once() -> None:
            with contextlib.suppress(StateUnavailable):
                await self._do(make())

        task = asyncio.get_running_loop().create_task(once())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _statuses(self, principal: Principal) -> list[LimitStatus]:
        wall = self.clock()
        k = _UserKeys(principal.name, wall)
        raw = await self._do(self._snapshot(keys=[*k.money, k.window, k.inflight]))
        now, d, m, spend, held, held_cost, wcount, wfirst, inflight = (_s(x) for x in raw)
        q = principal.quota
        _, day_reset = day_bounds(wall)
        _, month_reset = month_bounds(wall)
        out = []
        for name, limit, used, reset in (
            ("images_per_day", q.images_per_day, int(d) + int(held), day_reset),
            ("images_per_month", q.images_per_month, int(m) + int(held), month_reset),
            ("budget_usd_per_month", q.budget_usd_per_month,
             round(float(spend) + float(held_cost), 6), month_reset),
            ("requests_per_minute", q.requests_per_minute, int(wcount),
             (float(wfirst) + 60 - float(now) + wall) if wfirst else wall),
            ("max_concurrent", q.max_concurrent, int(inflight), None),
        ):
            remaining = None if limit is None else max(0, limit - used)
            out.append(LimitStatus(name, limit, used, remaining, reset))
        return out

    async def usage(self, principal: Principal) -> list[LimitStatus]:
        return await self._statuses(principal)

    async def all_usage(self) -> dict[str, dict[str, float]]:
        users = sorted(_s(u) for u in await self._do(self.r.smembers(self.USERS)))
        now = self.clock()
        pipe = self.r.pipeline(transaction=False)
        for user in users:
            k = _UserKeys(user, now)
            pipe.hgetall(k.day)
            pipe.hgetall(k.month)
        rows = await self._do(pipe.execute()) if users else []
        out: dict[str, dict[str, float]] = {}
        for i, user in enumerate(users):
            d = {_s(a): float(_s(b)) for a, b in rows[2 * i].items()}
            m = {_s(a): float(_s(b)) for a, b in rows[2 * i + 1].items()}
            out[user] = {"images_today": int(d.get("images", 0)),
                         "images_this_month": int(m.get("images", 0)),
                         "requests_today": int(d.get("requests", 0)),
                         "cache_hits_today": int(d.get("cache_hits", 0)),
                         "spend_usd_this_month": round(m.get("spend", 0.0), 6)}
        return out

    async def is_blocked(self, name: str) -> bool:
        return bool(await self._do(self.r.exists(_UserKeys(name, self.clock()).blocked)))

    async def set_blocked(self, name: str, blocked: bool) -> None:
        key = _UserKeys(name, self.clock()).blocked
        await self._do(self.r.set(key, str(self.clock())) if blocked else self.r.delete(key))

    @contextlib.asynccontextmanager
    async def admit(self, principal: Principal) -> AsyncIterator[None]:
        """A request slot across all replicas; the slot is a lease, freed on exit."""
        q = principal.quota
        if q.blocked:
            raise blocked_error(principal.name)
        k = _UserKeys(principal.name, self.clock())
        slot = uuid.uuid4().hex
        try:
            verdict, wait = (_s(x) for x in await self._do(self._admit(
                keys=[k.blocked, k.window, k.inflight],
                args=[_lim(q.requests_per_minute), _lim(q.max_concurrent), slot, self.lease])))
        except BaseException:
            self._hand_back(lambda: self.r.zrem(k.inflight, slot))
            raise
        if verdict == "blocked":
            raise blocked_error(principal.name)
        if verdict != "ok":
            headers = ratelimit_headers(await self._statuses(principal))
            if verdict == "requests_per_minute":
                raise QuotaRejected(
                    429, f"Rate limit reached: {q.requests_per_minute} requests per minute; "
                    f"0 remaining, resets in {duration(float(wait))}.", "rate_limit_exceeded",
                    verdict, float(wait), headers)
            raise QuotaRejected(
                429, f"Rate limit reached: at most {q.max_concurrent} requests in flight at "
                "once; wait for one to finish.", "rate_limit_exceeded", verdict, 1, headers)
        try:
            yield
        finally:
            await self._release(lambda: self.r.zrem(k.inflight, slot))

    async def reserve(self, principal: Principal, images: int, cost: float, size: str
                      ) -> Reservation:
        q = principal.quota
        rid = uuid.uuid4().hex
        made_at = self.clock()
        k = _UserKeys(principal.name, made_at)
        try:
            verdict = _s(await self._do(self._reserve(keys=k.money, args=[
                images, repr(float(cost)), _lim(q.images_per_day), _lim(q.images_per_month),
                _lim(q.budget_usd_per_month), rid, self.lease])))
        except BaseException:
            self._hand_back(self._unlease(principal.name, rid))
            raise
        if verdict == "ok":
            return RedisReservation(principal.name, images, cost, size, made_at, rid=rid)
        refusal = reservation_refusal(await self._statuses(principal), images, cost,
                                      fallback=verdict)
        assert refusal is not None  # with a fallback there always is one
        raise refusal

    async def commit(self, reservation: Reservation, images: int, cost: float) -> None:
        if reservation.settled:
            return
        # The periods of the reservation, not of now: see Reservation.made_at.
        k = _UserKeys(reservation.user, reservation.made_at)
        rid = _rid(reservation)
        keys = [*k.money, k.committed(rid)]
        args = [rid, images, repr(float(cost)), DAY_KEY_TTL, MONTH_KEY_TTL, COMMIT_MARKER_TTL]
        try:
            await self._do(self._commit(keys=keys, args=args))
        except StateUnavailable:
            # The reply may be what was lost, after Redis charged the images: without a
            # second try the client would get a 503 for images it was charged. The marker
            # makes the second try a no-op if the first one ran.
            await self._do(self._commit(keys=keys, args=args))
        reservation.settled = True

    def _unlease(self, user: str, rid: str) -> Callable[[], Awaitable[object]]:
        """The refund script for lease ``rid``. If a commit's answer was lost but it ran,
        the refund finds no lease: a no-op (so it is always safe to send)."""
        k = _UserKeys(user, self.clock())
        return lambda: self._refund(keys=[k.held, k.leases, k.leasev], args=[rid])

    async def refund(self, reservation: Reservation) -> None:
        if not reservation.settled:
            reservation.settled = True
            await self._release(self._unlease(reservation.user, _rid(reservation)))

    def refund_soon(self, reservation: Reservation) -> None:
        if not reservation.settled:
            reservation.settled = True
            self._hand_back(self._unlease(reservation.user, _rid(reservation)))

    def count_request(self, principal: Principal, cache_hit: bool) -> Awaitable[None]:
        return asyncio.ensure_future(self._count_request(principal, cache_hit))

    async def _count_request(self, principal: Principal, cache_hit: bool) -> None:
        k = _UserKeys(principal.name, self.clock())
        pipe = self.r.pipeline(transaction=False)
        for key, ttl in ((k.day, DAY_KEY_TTL), (k.month, MONTH_KEY_TTL)):
            pipe.hincrby(key, "requests", 1)
            pipe.hincrby(key, "cache_hits", int(cache_hit))
            pipe.expire(key, ttl)
        pipe.sadd(self.USERS, principal.name)
        await self._do(pipe.execute())

    async def close(self) -> None:
        for task in list(self._pending):
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
        await super().close()


class RedisReservation(Reservation):
    """A reservation named in Redis, so commit and refund find their own lease."""

    def __init__(self, user: str, images: int, cost: float, size: str, made_at: float, *,
                 rid: str) -> None:
        super().__init__(user, images, cost, size, made_at)
        self.rid = rid


def _rid(r: Reservation) -> str:
    if not isinstance(r, RedisReservation):
        raise TypeError("not a Redis reservation")
    return r.rid


# --------------------------------------------------------------------------- cache index

_C = PREFIX + "{c}:"

_POOL = """
local items = redis.call('LRANGE', KEYS[1], 0, 9)  -- at most MAX_POOL are ever served
if #items > 0 then redis.call('ZADD', KEYS[2], 'XX', ARGV[1], ARGV[2]) end
return items
"""

# KEYS: pool, lru, created, psize, total, refs. ARGV: key, now, then sha, size pairs.
_APPEND = """
redis.call('ZADD', KEYS[3], 'NX', ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
local added = 0
for i = 3, #ARGV, 2 do
  redis.call('RPUSH', KEYS[1], ARGV[i] .. ' ' .. ARGV[i + 1])
  redis.call('HINCRBY', KEYS[6], ARGV[i], 1)
  added = added + tonumber(ARGV[i + 1])
end
redis.call('HINCRBY', KEYS[4], ARGV[1], added)
redis.call('INCRBY', KEYS[5], added)
return 'ok'
"""

# KEYS: lru, created, psize, total, refs.
# ARGV: prefix of pool keys, max bytes, cutoff, then 0 and the keys to keep (in use);
# or, to forget one pool, 1, its key and the items seen: it goes (whatever its age)
# only if it still begins with them.
_EVICT = """
local orphans = {}
local function drop(key)
  local pool = ARGV[1] .. key
  for _, item in ipairs(redis.call('LRANGE', pool, 0, -1)) do
    local sha = string.sub(item, 1, string.find(item, ' ') - 1)
    if redis.call('HINCRBY', KEYS[5], sha, -1) <= 0 then
      redis.call('HDEL', KEYS[5], sha)
      table.insert(orphans, sha)
    end
  end
  redis.call('DEL', pool)
  redis.call('ZREM', KEYS[1], key)
  redis.call('ZREM', KEYS[2], key)
  redis.call('DECRBY', KEYS[4], tonumber(redis.call('HGET', KEYS[3], key) or '0'))
  redis.call('HDEL', KEYS[3], key)
end
local ndrop = tonumber(ARGV[4])
if ndrop > 0 then  -- forget one key, if its pool is still what was seen
  local seen = #ARGV - 5
  local pool = redis.call('LRANGE', ARGV[1] .. ARGV[5], 0, seen - 1)
  if seen == 0 or #pool ~= seen then return {{}, {}} end
  for i = 1, seen do
    if pool[i] ~= ARGV[5 + i] then return {{}, {}} end
  end
  drop(ARGV[5])
  return {{}, orphans}
end
local keep = {}
for i = 5 + ndrop, #ARGV do keep[ARGV[i]] = true end
local held = {}
for _, key in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[3])) do
  if keep[key] then table.insert(held, key) else drop(key) end
end
local max = tonumber(ARGV[2])
local kept = 0  -- kept keys stay at the front of the LRU order: skip past them
while tonumber(redis.call('GET', KEYS[4]) or '0') > max do
  local oldest = redis.call('ZRANGE', KEYS[1], kept, kept)
  if #oldest == 0 then break end
  if keep[oldest[1]] then
    kept = kept + 1
    table.insert(held, oldest[1])
  else
    drop(oldest[1])
  end
end
return {held, orphans}
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('PUBLISH', KEYS[2], ARGV[2])
return 'ok'
"""


class RedisCacheIndex(_Guarded):
    """:class:`gateway.cache.CacheIndex` in Redis, with a cross-replica flight lock.

    Waiting for another replica's flight does not poll hot: the owner publishes the key
    on release and waiters wake on that message; a backing-off existence check covers
    a lost message or an owner that died (its lock expires).
    """

    CHANNEL = _C + "flights"
    shared = True

    def __init__(self, client: Any, timeout: float) -> None:
        super().__init__(client, timeout)
        self._pool = client.register_script(_POOL)
        self._append = client.register_script(_APPEND)
        self._evict = client.register_script(_EVICT)
        self._release = client.register_script(_RELEASE)
        self._tokens: dict[str, str] = {}
        self._wakers: dict[str, asyncio.Event] = {}
        self._waiting: dict[str, int] = {}  # waiters per key: the last one drops its waker
        self._listener: asyncio.Task[None] | None = None

    async def pool(self, key: str, now: float) -> list[tuple[str, int]]:
        items = await self._do(self._pool(keys=[_C + "pool:" + key, _C + "lru"],
                                          args=[repr(now), key]))
        out = []
        for item in items:
            sha, _, size = _s(item).partition(" ")
            out.append((sha, int(size)))
        return out

    async def append(self, key: str, items: list[tuple[str, int]], now: float) -> None:
        args: list[Any] = [key, repr(now)]
        for sha, size in items:
            args += [sha, size]
        await self._do(self._append(keys=[_C + "pool:" + key, _C + "lru", _C + "created",
                                          _C + "psize", _C + "total", _C + "refs"], args=args))

    async def evict(self, max_bytes: int, ttl_seconds: int, now: float,
                    keep: frozenset[str] = frozenset()) -> Evicted:
        held, orphans = await self._do(self._evict(
            keys=[_C + "lru", _C + "created", _C + "psize", _C + "total", _C + "refs"],
            args=[_C + "pool:", max_bytes, repr(now - ttl_seconds), 0, *sorted(keep)]))
        return Evicted([_s(o) for o in orphans], frozenset(_s(k) for k in held))

    async def unreferenced(self, shas: list[str]) -> list[str]:
        counts = await self._do(self.r.hmget(_C + "refs", shas))
        return [sha for sha, n in zip(shas, counts, strict=True) if n is None or int(n) <= 0]

    async def forget(self, key: str, seen: list[tuple[str, int]]) -> list[str]:
        _, orphans = await self._do(self._evict(
            keys=[_C + "lru", _C + "created", _C + "psize", _C + "total", _C + "refs"],
            args=[_C + "pool:", 0, 0, 1, key, *[f"{sha} {size}" for sha, size in seen]]))
        return [_s(o) for o in orphans]

    async def stats(self) -> tuple[int, int]:
        pipe = self.r.pipeline(transaction=False)
        pipe.zcard(_C + "created")
        pipe.get(_C + "total")
        entries, total = await self._do(pipe.execute())
        return int(entries), int(total or 0)

    # ---- single flight across replicas
    async def acquire_flight(self, key: str, ttl: float) -> bool:
        token = secrets.token_hex(8)
        ok = await self._do(self.r.set(_C + "flight:" + key, token, nx=True,
                                       px=max(1, int(ttl * 1000))))
        if ok:
            self._tokens[key] = token
        return bool(ok)

    async def release_flight(self, key: str) -> None:
        token = self._tokens.pop(key, "")
        # Best effort: an unreleased lock expires, and waiters see that.
        with contextlib.suppress(StateUnavailable):
            await self._do(self._release(keys=[_C + "flight:" + key, self.CHANNEL],
                                         args=[token, key]))

    async def wait_flight(self, key: str, within: float) -> None:
        """Return when another replica's flight for ``key`` ends (or after ``within`` s)."""
        self._ensure_listener()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        delay = 0.05
        self._waiting[key] = self._waiting.get(key, 0) + 1
        try:
            while True:
                waker = self._wakers.setdefault(key, asyncio.Event())  # before the check
                if not await self._do(self.r.exists(_C + "flight:" + key)):
                    return
                left = deadline - loop.time()
                if left <= 0:
                    return
                try:
                    async with asyncio.timeout(min(delay, left)):
                        await waker.wait()
                    return
                except TimeoutError:
                    delay = min(delay * 2, 1.0)
        finally:
            # A flight that ended unseen (its lock expired, or it was over before the
            # check) publishes nothing: the waker would stay here for ever.
            self._waiting[key] -= 1
            if not self._waiting[key]:
                del self._waiting[key]
                self._wakers.pop(key, None)

    def _ensure_listener(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            try:
                pubsub = self.r.pubsub()
            except (AttributeError, NotImplementedError):
                return  # no pub/sub on this client (cluster): waiters fall back to polling
            try:
                await pubsub.subscribe(self.CHANNEL)
                backoff = 0.1
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True,
                                                   timeout=5.0)
                    if msg and msg.get("type") == "message":
                        waker = self._wakers.pop(_s(msg["data"]), None)
                        if waker is not None:
                            waker.set()
            except (RedisError, OSError):
                await asyncio.sleep(backoff)  # Redis away: retry the subscription, backing off
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        await super().close()


# --------------------------------------------------------------------------- abuse

_A = PREFIX + "{a}:"

# KEYS: member's end users (ZSET user -> last seen), member's limit hits (LIST of times),
# raised markers for many_end_users and repeated_limit_hits. ARGV: window s, end user
# ('' for none), 1 if a limit was hit, distinct end users, limit hits, users tracked.
_ABUSE = _now_lua() + """
local window = tonumber(ARGV[1])
local cutoff = now - window
local ttl = math.ceil(window * 1000)
local out = {}
if ARGV[2] ~= '' then
  redis.call('ZADD', KEYS[1], now, ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. cutoff)
  local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[6])
  if over > 0 then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, over - 1) end
  redis.call('PEXPIRE', KEYS[1], ttl)
  local distinct = redis.call('ZCARD', KEYS[1])
  if distinct >= tonumber(ARGV[4]) and redis.call('SET', KEYS[3], '1', 'NX', 'PX', ttl) then
    table.insert(out, 'many_end_users')
    table.insert(out, distinct)
  end
end
if ARGV[3] == '1' then
  local keep = math.max(1, tonumber(ARGV[5]))
  redis.call('RPUSH', KEYS[2], tostring(now))
  redis.call('LTRIM', KEYS[2], -keep, -1)
  redis.call('PEXPIRE', KEYS[2], ttl)
  local hits = 0
  for _, t in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
    if tonumber(t) >= cutoff then hits = hits + 1 end
  end
  if hits >= tonumber(ARGV[5]) and redis.call('SET', KEYS[4], '1', 'NX', 'PX', ttl) then
    table.insert(out, 'repeated_limit_hits')
    table.insert(out, hits)
  end
end
return out
"""


class RedisAbuseMonitor(_Guarded):
    """:class:`gateway.abuse.Abuse` with the windows in Redis: every replica's requests
    count towards one window per member, and a signal is raised once across replicas.

    The script runs in a task of its own after the answer: a request with a ``user``
    field or a limit hit costs the client no Redis round trip. If Redis is away, the
    observation is lost (logged by :meth:`_do`); nothing else is.
    """

    def __init__(self, client: Any, timeout: float, config: AbuseConfig) -> None:
        super().__init__(client, timeout)
        self._cfg = config
        self._script = client.register_script(_ABUSE)
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
        except StateUnavailable:  # logged by _do; this observation is lost, nothing else
            return
        for suspicion in found:
            try:
                on_suspicion(suspicion)
            except Exception:  # a task's error would otherwise go unseen
                log.exception("abuse_report_failed", member=member)

    async def observe(self, member: str, end_user: str | None, limit_hit: bool
                      ) -> list[Suspicion]:
        """Record one request now; the signals it raises across replicas."""
        base = _A + member.encode("utf-8").hex() + ":"
        found = await self._do(self._script(
            keys=[base + "users", base + "hits", base + "raised:many_end_users",
                  base + "raised:repeated_limit_hits"],
            args=[self._cfg.window_seconds, end_user or "", int(limit_hit),
                  self._cfg.distinct_end_users, self._cfg.limit_hits,
                  MAX_TRACKED_END_USERS]))
        return [Suspicion(member, _s(found[i]), int(found[i + 1]), self._cfg.window_seconds)
                for i in range(0, len(found), 2)]

    async def close(self) -> None:
        if self._tasks:  # observations still on their way: let them land
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await super().close()


# --------------------------------------------------------------------------- bytes in Redis


class RedisBlobStore(BlobStore):
    """Cache blobs in Redis (``images.store: redis``); ``dir`` is a local read spool.

    The cache's byte budget (``cache.max_bytes``) bounds them: eviction hands back
    orphaned shas and :meth:`delete` drops them. Blocking client: called from executors.
    """

    def __init__(self, client: Any, spool: Path) -> None:
        super().__init__(spool)
        self.r = client

    def _key(self, sha: str) -> str:
        return _C + "blob:" + sha

    def fetch(self, blobs: list[tuple[str, int]]) -> list[str]:
        """Spool ``blobs`` from Redis (those a request serves, not its whole pool); the
        shas Redis does not have (at that size) either."""
        lost = []
        for sha, size in blobs:
            try:
                data = self.r.get(self._key(sha))
            except RedisError as exc:
                raise StateUnavailable() from exc
            if data is None or len(data) != size:
                lost.append(sha)
            else:
                atomic_write(self.path(sha), data)
        return lost

    def write(self, images: list[bytes], created: list[str]) -> list[Item]:
        """Spool and store ``images``; ``created`` gets the shas new here or in Redis
        (if the pipeline fails, all of them: it may have run)."""
        items = super().write(images, created)
        try:
            pipe = self.r.pipeline(transaction=False)
            for item, data in zip(items, images, strict=True):
                pipe.set(self._key(item.sha256), data, nx=True)
            new = pipe.execute()
        except RedisError as exc:
            created.extend(i.sha256 for i in items if i.sha256 not in created)
            raise StateUnavailable() from exc
        created.extend(i.sha256 for i, n in zip(items, new, strict=True)
                       if n and i.sha256 not in created)
        return items

    def delete(self, shas: list[str]) -> None:
        super().delete(shas)
        if shas:
            with contextlib.suppress(RedisError):
                self.r.delete(*[self._key(s) for s in shas])

    def prune(self) -> int:
        """Delete spooled copies of blobs no longer in Redis; how many.

        Only the replica whose pass evicts a blob deletes its own copy: without this the
        other replicas' spools grew by every blob they ever read (53 MB after 2,000
        misses on two replicas with a 100-blob budget, measured by a reviewer). A copy
        pruned while its blob is being written is fetched again by :meth:`fetch`.
        """
        files = list(self.dir.glob("*/*.png"))
        gone = 0
        for start in range(0, len(files), 500):
            batch = files[start:start + 500]
            pipe = self.r.pipeline(transaction=False)
            for f in batch:
                pipe.exists(self._key(f.stem))
            try:
                present = pipe.execute()
            except RedisError as exc:
                raise StateUnavailable() from exc
            for f, there in zip(batch, present, strict=True):
                if not there:
                    f.unlink(missing_ok=True)
                    gone += 1
        return gone


_I = PREFIX + "{img}:"

# KEYS: data, mint, size, total. ARGV: id, bytes, now, budget (-1 none), data prefix.
_PUT_IMAGE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[1], ARGV[2])
  redis.call('HSET', KEYS[3], ARGV[1], string.len(ARGV[2]))
  redis.call('INCRBY', KEYS[4], string.len(ARGV[2]))
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
local budget = tonumber(ARGV[4])
local gone = 0
while budget >= 0 and tonumber(redis.call('GET', KEYS[4]) or '0') > budget do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #oldest == 0 or oldest[1] == ARGV[1] then break end
  redis.call('DEL', ARGV[5] .. oldest[1])
  redis.call('ZREM', KEYS[2], oldest[1])
  redis.call('DECRBY', KEYS[4], tonumber(redis.call('HGET', KEYS[3], oldest[1]) or '0'))
  redis.call('HDEL', KEYS[3], oldest[1])
  gone = gone + 1
end
return gone
"""

# KEYS: mint, size, total. ARGV: cutoff, data prefix.
_SWEEP_IMAGES = """
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])
for _, id in ipairs(dead) do
  redis.call('DEL', ARGV[2] .. id)
  redis.call('ZREM', KEYS[1], id)
  redis.call('DECRBY', KEYS[3], tonumber(redis.call('HGET', KEYS[2], id) or '0'))
  redis.call('HDEL', KEYS[2], id)
end
return #dead
"""


class RedisImageStore(ImageStore):
    """Signed-URL images kept in Redis under a byte budget (``images.max_bytes``).

    Any replica serves any URL: a local file in ``dir`` is only a spool, filled from
    Redis on first download. Over budget, the images minted longest ago go first.
    """

    def __init__(self, client: Any, directory: Path, signing_key: bytes, ttl_seconds: int,
                 max_bytes: int | None) -> None:
        super().__init__(directory, signing_key, ttl_seconds)
        self.r = client
        self.max_bytes = max_bytes
        self._put = client.register_script(_PUT_IMAGE)
        self._sweep = client.register_script(_SWEEP_IMAGES)

    def put(self, data: bytes) -> str:
        image_id = hashlib.sha256(data).hexdigest()
        try:
            self._put(keys=[_I + "data:" + image_id, _I + "mint", _I + "size", _I + "total"],
                      args=[image_id, data, repr(time.time()), _lim(self.max_bytes),
                            _I + "data:"])
        except RedisError as exc:
            raise StateUnavailable() from exc
        return super().put(data)

    def put_file(self, source: Path, image_id: str) -> str:
        return self.put(source.read_bytes())

    def resolve(self, image_id: str, expires: str, signature: str, now: float | None = None
                ) -> Path:
        try:
            return super().resolve(image_id, expires, signature, now)
        except ApiError as exc:
            # not_found comes only after the signature and expiry checks passed
            if exc.code != "not_found" or not ID_RE.match(image_id):
                raise
        try:
            data = self.r.get(_I + "data:" + image_id)
        except RedisError as exc:
            raise StateUnavailable() from exc
        if data is not None:
            atomic_write(self.path(image_id), data)
        return super().resolve(image_id, expires, signature, now)

    async def fetch(self, image_id: str, expires: str, signature: str) -> Path:
        """In the local spool: answered on the loop. Otherwise the blocking Redis read
        and the spool write run in the executor, never stalling the other requests."""
        try:
            return ImageStore.resolve(self, image_id, expires, signature)
        except ApiError as exc:
            if exc.code != "not_found" or not ID_RE.match(image_id):
                raise
        return await asyncio.to_thread(self.resolve, image_id, expires, signature)

    def sweep(self, now: float | None = None) -> int:
        removed = super().sweep(now)
        cutoff = (now if now is not None else time.time()) - self.ttl
        try:
            removed += int(self._sweep(keys=[_I + "mint", _I + "size", _I + "total"],
                                       args=[repr(cutoff), _I + "data:"]))
        except RedisError as exc:
            log.warning("image_sweep_failed", error=str(exc))
        return removed


# --------------------------------------------------------------------------- signing key


def shared_signing_key(client: Any, configured: str, wait_seconds: float = 30.0) -> bytes:
    """The configured key, else the one the first replica stored (``SET NX``).

    Waits (bounded) for Redis at start-up: under compose or Kubernetes the gateway may
    come up a moment before Redis does.
    """
    if configured:
        return configured.encode("utf-8")
    key = PREFIX + "signing-key"
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            client.set(key, secrets.token_bytes(32).hex(), nx=True)
            return bytes.fromhex(_s(client.get(key)))
        except RedisError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)  # Redis not up yet; bounded by the deadline above
