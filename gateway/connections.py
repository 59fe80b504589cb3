"""Connections the gateway does not keep: silent sockets, idle keep-alives, and the fd limit.

aiohttp closes an idle keep-alive connection after ``keepalive_timeout`` but has no
deadline for the first request header: a socket that sends nothing, or a header a byte
at a time, holds a file descriptor until the client goes (aiohttp's own default
``keepalive_timeout`` of 3630 s is the only bound). 600 such sockets under ``ulimit -n
512`` took the gateway down with ``Too many open files``. :class:`GatewayRunner` starts
a timer per connection and closes it if no whole request header has arrived by
``server.header_timeout_seconds``; later requests on a kept-alive connection are bounded
by aiohttp's keep-alive timer, which a partial header does not extend.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler


class _HeaderDeadlineServer(web.Server):
    """aiohttp's low-level server with a header deadline on every new connection.

    ``connection_made`` and ``request_factory`` are the server's hooks for a new
    connection and for each whole request header it parsed (also for a malformed one,
    which aiohttp answers 400 itself)."""

    def __init__(self, plain: web.Server, header_timeout: float) -> None:
        # The same handler, request factory and per-connection arguments (keep-alive,
        # access log) as the server aiohttp built for the application.
        super().__init__(plain.request_handler, request_factory=plain.request_factory,
                         handler_cancellation=plain.handler_cancellation,
                         loop=asyncio.get_running_loop(), **plain._kwargs)
        self._header_timeout = header_timeout
        self._deadlines: dict[RequestHandler, asyncio.TimerHandle] = {}
        self._make = self.request_factory
        self.request_factory = self._on_request

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self._deadlines[handler] = asyncio.get_running_loop().call_later(
            self._header_timeout, self._expire, handler)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None
                        ) -> None:
        self._disarm(handler)
        super().connection_lost(handler, exc)

    def _on_request(self, message: Any, payload: Any, protocol: RequestHandler,
                    writer: Any, task: Any) -> web.BaseRequest:
        self._disarm(protocol)
        return self._make(message, payload, protocol, writer, task)

    def _disarm(self, handler: RequestHandler) -> None:
        timer = self._deadlines.pop(handler, None)
        if timer is not None:
            timer.cancel()

    def _expire(self, handler: RequestHandler) -> None:
        """No whole header in time: drop the socket (there is no request to answer)."""
        self._deadlines.pop(handler, None)
        handler.force_close()


class GatewayRunner(web.AppRunner):
    """An :class:`aiohttp.web.AppRunner` whose connections must send a whole request
    header within ``header_timeout`` seconds and are closed after ``keepalive_timeout``
    idle seconds between requests."""

    def __init__(self, app: web.Application, *, header_timeout: float,
                 keepalive_timeout: float, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=keepalive_timeout, **kwargs)
        self._header_timeout = header_timeout

    async def _make_server(self) -> web.Server:
        return _HeaderDeadlineServer(await super()._make_server(), self._header_timeout)


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one; returns (soft, hard) after.

    Every client connection is a file descriptor, and distributions start services with
    a soft limit as low as 1024 (512 in the report) while allowing far more. An
    unlimited hard limit is capped at what the kernel accepts for one process.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if target == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        # On failure keep the limit we have: the gateway still serves.
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)
