"""The quota store every replica shares, in Redis.

Why leases: a replica can die between reserve and commit. Reservations and in-flight
slots are recorded with an expiry (the longest a generation may take), so a crashed
replica's holds free themselves instead of eating a user's quota for the day. The
checks and takes are Lua scripts (:mod:`gateway.redis.client`), atomic in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from gateway.auth import Principal
from gateway.errors import StorageUnavailable
from gateway.quota import (
    LimitStatus,
    Reservation,
    Usage,
    blocked_error,
    new_id,
    periods,
    rate_refusal,
    ratelimit_headers,
    reservation_refusal,
    statuses,
)
from gateway.redis.client import PREFIX, Guarded, limit_arg, lua, text

DAY_KEY_TTL = 3 * 86400
MONTH_KEY_TTL = 400 * 86400
COMMIT_MARKER_TTL = 3600  # a commit sent twice (lost reply) is recognised for an hour


class UserKeys:
    """The keys of one member's quota at one moment (its day and month)."""

    def __init__(self, user: str, now: float) -> None:
        self._tag = tag = f"{PREFIX}{{u:{user}}}:"
        day, _, month, _ = periods(int(now // 86400))
        self.day, self.month = tag + "ledger:" + day, tag + "ledger:" + month
        self.held, self.leases, self.leasev = tag + "held", tag + "leases", tag + "leasev"
        self.window, self.inflight, self.blocked = tag + "window", tag + "inflight", tag + "blocked"

    def committed(self, rid: str) -> str:
        return self._tag + "committed:" + rid

    @property
    def money(self) -> list[str]:
        return [self.day, self.month, self.held, self.leases, self.leasev]


class RedisQuota(Guarded):
    """:class:`gateway.quota.QuotaStore` shared by every replica through Redis."""

    USERS = PREFIX + "users"

    def __init__(self, client: Any, timeout: float, lease_seconds: float,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(client, timeout)
        self.lease = lease_seconds
        # The wall clock (unix seconds) that picks ledger periods; tests inject their own.
        # Leases and the minute window run on Redis's own clock (TIME) in the scripts.
        self.clock = clock
        self._admit = client.register_script(lua("now", "admit"))
        self._reserve = client.register_script(lua("leases", "now", "reserve"))
        self._commit = client.register_script(lua("leases", "commit"))
        self._refund = client.register_script(lua("leases", "refund"))
        self._snapshot = client.register_script(lua("leases", "now", "snapshot"))
        self._pending: set[asyncio.Task[None]] = set()

    def _keep(self, task: asyncio.Task[None]) -> None:
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _release(self, make: Callable[[], Awaitable[object]]) -> None:
        """Run a release (refund, slot) now, or keep retrying in the background while
        Redis is away: held quota comes back soon after Redis does, not when the lease
        expires. Never raises: the request's own outcome must not be masked."""
        try:
            await self._do(make())
            return
        except StorageUnavailable:
            pass
        loop = asyncio.get_running_loop()

        async def retry() -> None:
            deadline, delay = loop.time() + self.lease, 0.25
            while loop.time() < deadline:
                await asyncio.sleep(delay)  # backing off while Redis is down
                try:
                    await self._do(make())
                    return
                except StorageUnavailable:
                    delay = min(delay * 2, 5.0)

        self._keep(loop.create_task(retry()))

    def _hand_back(self, make: Callable[[], Awaitable[object]]) -> None:
        """Undo a take in the background: one whose reply never came (a timeout, a
        dropped connection, or the client leaving while the script ran; the script may
        have run, and nothing else would give back what it took before its lease ends).
        Undoing an id never taken is a no-op, so this is always safe. One try: if Redis
        is down it does not help to queue one retry per request, and the lease still
        ends the hold."""

        async def once() -> None:
            with contextlib.suppress(StorageUnavailable):
                await self._do(make())

        self._keep(asyncio.get_running_loop().create_task(once()))

    async def _statuses(self, principal: Principal) -> list[LimitStatus]:
        wall = self.clock()
        k = UserKeys(principal.name, wall)
        raw = await self._do(self._snapshot(keys=[*k.money, k.window, k.inflight]))
        now, d, m, spend, held, held_cost, wcount, wfirst, inflight = (text(x) for x in raw)
        # The window's reset, from Redis's clock to this replica's wall clock.
        reset = (float(wfirst) + 60 - float(now) + wall) if wfirst else wall
        return statuses(principal.quota, Usage(
            int(d), int(m), float(spend), int(held), float(held_cost), int(wcount), reset,
            int(inflight)), wall)

    async def usage(self, principal: Principal) -> list[LimitStatus]:
        return await self._statuses(principal)

    async def all_usage(self) -> dict[str, dict[str, float]]:
        users = sorted(text(u) for u in await self._do(self.r.smembers(self.USERS)))
        now = self.clock()
        pipe = self.r.pipeline(transaction=False)
        for user in users:
            k = UserKeys(user, now)
            pipe.hgetall(k.day)
            pipe.hgetall(k.month)
        rows = await self._do(pipe.execute()) if users else []
        out: dict[str, dict[str, float]] = {}
        for i, user in enumerate(users):
            d = {text(a): float(text(b)) for a, b in rows[2 * i].items()}
            m = {text(a): float(text(b)) for a, b in rows[2 * i + 1].items()}
            out[user] = {"images_today": int(d.get("images", 0)),
                         "images_this_month": int(m.get("images", 0)),
                         "requests_today": int(d.get("requests", 0)),
                         "cache_hits_today": int(d.get("cache_hits", 0)),
                         "spend_usd_this_month": round(m.get("spend", 0.0), 6)}
        return out

    async def is_blocked(self, name: str) -> bool:
        return bool(await self._do(self.r.exists(UserKeys(name, self.clock()).blocked)))

    async def set_blocked(self, name: str, blocked: bool) -> None:
        key = UserKeys(name, self.clock()).blocked
        await self._do(self.r.set(key, str(self.clock())) if blocked else self.r.delete(key))

    @contextlib.asynccontextmanager
    async def admit(self, principal: Principal) -> AsyncIterator[None]:
        """A request slot across all replicas; the slot is a lease, freed on exit."""
        q = principal.quota
        if q.blocked:
            raise blocked_error(principal.name)
        k = UserKeys(principal.name, self.clock())
        slot = new_id()
        try:
            verdict, wait = (text(x) for x in await self._do(self._admit(
                keys=[k.blocked, k.window, k.inflight],
                args=[limit_arg(q.requests_per_minute), limit_arg(q.max_concurrent), slot,
                      self.lease])))
        except BaseException:
            self._hand_back(lambda: self.r.zrem(k.inflight, slot))
            raise
        if verdict == "blocked":
            raise blocked_error(principal.name)
        if verdict != "ok":
            raise rate_refusal(verdict, q, float(wait),
                               ratelimit_headers(await self._statuses(principal)))
        try:
            yield
        finally:
            await self._release(lambda: self.r.zrem(k.inflight, slot))

    async def reserve(self, principal: Principal, images: int, cost: float, size: str
                      ) -> Reservation:
        q = principal.quota
        reservation = Reservation(principal.name, images, cost, size, self.clock())
        k = UserKeys(principal.name, reservation.made_at)
        try:
            verdict = text(await self._do(self._reserve(keys=k.money, args=[
                images, repr(float(cost)), limit_arg(q.images_per_day),
                limit_arg(q.images_per_month), limit_arg(q.budget_usd_per_month),
                reservation.id, self.lease])))
        except BaseException:
            self._hand_back(self._unlease(principal.name, reservation.id))
            raise
        if verdict == "ok":
            return reservation
        refusal = reservation_refusal(await self._statuses(principal), images, cost,
                                      fallback=verdict)
        assert refusal is not None  # with a fallback there always is one
        raise refusal

    async def commit(self, reservation: Reservation, images: int, cost: float) -> None:
        if reservation.settled:
            return
        # The periods of the reservation, not of now: see Reservation.made_at.
        k = UserKeys(reservation.user, reservation.made_at)
        rid = reservation.id
        keys = [*k.money, k.committed(rid)]
        args = [rid, images, repr(float(cost)), DAY_KEY_TTL, MONTH_KEY_TTL, COMMIT_MARKER_TTL]
        try:
            await self._do(self._commit(keys=keys, args=args))
        except StorageUnavailable:
            # The reply may be what was lost, after Redis charged the images: without a
            # second try the client would get a 503 for images it was charged. The marker
            # makes the second try a no-op if the first one ran.
            await self._do(self._commit(keys=keys, args=args))
        reservation.settled = True

    def _unlease(self, user: str, rid: str) -> Callable[[], Awaitable[object]]:
        """The refund script for lease ``rid``. If a commit's answer was lost but it ran,
        the refund finds no lease: a no-op (so it is always safe to send)."""
        k = UserKeys(user, self.clock())
        return lambda: self._refund(keys=[k.held, k.leases, k.leasev], args=[rid])

    async def refund(self, reservation: Reservation) -> None:
        if not reservation.settled:
            reservation.settled = True
            await self._release(self._unlease(reservation.user, reservation.id))

    def refund_soon(self, reservation: Reservation) -> None:
        """:meth:`refund` in the background, retried like it while Redis is away: a
        failed charge's hold (its commit lost to an outage) has nobody else to give it
        back, and one try during the outage would leave it held until the lease ends."""
        if not reservation.settled:
            reservation.settled = True
            self._keep(asyncio.get_running_loop().create_task(
                self._release(self._unlease(reservation.user, reservation.id))))

    def count_request(self, principal: Principal, cache_hit: bool) -> Awaitable[None]:
        return asyncio.ensure_future(self._count_request(principal, cache_hit))

    async def _count_request(self, principal: Principal, cache_hit: bool) -> None:
        k = UserKeys(principal.name, self.clock())
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
