"""The member store every replica shares, in Redis, with changes announced by pub/sub.

A change is one script (compare-and-set on the member's record, tombstones for revoked
tokens, a version bump and a ``PUBLISH``), so two admins on two replicas cannot both
rotate past the token limit. Every replica's :meth:`RedisMembers.watch` hears the
publish and reloads its authenticator's table: a revoke reaches every replica within
one round trip. Pub/sub delivers at most once, so the watcher also reads the version
counter once a second while nothing arrives, and reloads after any reconnect: a lost
message costs at most a second, never a revoked token that keeps working.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from gateway.errors import StorageUnavailable
from gateway.members import Member, Snapshot
from gateway.redis.client import FAILURES, PREFIX, Guarded, log, lua, text

_M = PREFIX + "{m}:"
MEMBERS, REVOKED, VERSION = _M + "members", _M + "revoked", _M + "version"
CHANNEL = _M + "changed"
CHECK_EVERY_SECONDS = 1.0  # the version read while no message arrives


class RedisMembers(Guarded):
    """:class:`gateway.members.MemberStore` shared by every replica through Redis."""

    def __init__(self, client: Any, timeout: float) -> None:
        super().__init__(client, timeout)
        self._swap = client.register_script(lua("members_swap"))

    async def load(self) -> Snapshot:
        async def read() -> list[Any]:
            async with self.r.pipeline(transaction=True) as pipe:
                pipe.hgetall(MEMBERS).smembers(REVOKED)
                return list(await pipe.execute())

        records, revoked = await self._do(read())
        return Snapshot({text(k): Member.from_json(v) for k, v in records.items()},
                        frozenset(text(d) for d in revoked))

    async def swap(self, name: str, old: Member | None, new: Member | None,
                   revoked: Sequence[str] = ()) -> bool:
        done = await self._do(self._swap(
            keys=[MEMBERS, REVOKED, VERSION, CHANNEL],
            args=[name, old.to_json() if old else "", new.to_json() if new else "",
                  *revoked]))
        return bool(int(done))

    async def _version(self) -> object:
        return await self._do(self.r.get(VERSION))

    async def watch(self, changed: Callable[[], Awaitable[None]]) -> None:
        backoff = 0.1
        while True:
            pubsub = None
            try:
                with contextlib.suppress(AttributeError, NotImplementedError):
                    pubsub = self.r.pubsub()  # none on a cluster client: the version only
                if pubsub is not None:
                    await pubsub.subscribe(CHANNEL)
                seen = await self._version()
                await changed()  # whatever happened while not subscribed
                backoff = 0.1
                await self._follow(pubsub, changed, seen)
            except (*FAILURES, StorageUnavailable) as exc:  # Redis away
                log.warning("members_watch_interrupted", error=type(exc).__name__)
            except Exception:  # a bug here must not end the watching for good
                log.exception("members_watch_failed")
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
            await asyncio.sleep(backoff)  # then resubscribe (and reload), backing off
            backoff = min(backoff * 2, 5.0)

    async def _follow(self, pubsub: Any, changed: Callable[[], Awaitable[None]],
                      seen: object) -> None:
        """``seen`` is the version read just before the last ``changed()``, which so
        loaded at least that version. Only these reloads move it: any other load (an
        admin's listing, a failed change) applies nothing to the authenticator, and
        counting it as seen would hide a change whose message was lost."""
        while True:
            message = None
            if pubsub is not None:
                message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                   timeout=CHECK_EVERY_SECONDS)
            else:
                await asyncio.sleep(CHECK_EVERY_SECONDS)  # a cluster: poll the version
            version = await self._version()
            if message is not None or version != seen:
                seen = version
                await changed()
