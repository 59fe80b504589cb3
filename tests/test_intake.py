"""Intake under load (issue 19, items 2 and 3): admission before the body is read, a
gateway-wide budget of bodies being read, and sockets that send nothing are closed.

Every wait polls with a deadline; none of them asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import resource
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support import TOKENS, eventually, eventually_sync, multipart_body, png_bytes

from gateway.keys import UPLOAD_BUDGET
from gateway.upload import UploadBudget

BOUNDARY = "intake-boundary"
DEADLINE = 20.0


async def held_upload(port: int, body: bytes, sent: int
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A POST whose headers and first ``sent`` body bytes are sent; the rest never is."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/images/variations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + f"Authorization: Bearer {TOKENS['alice']}\r\n".encode()
        + f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n".encode()
        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:sent])
    await writer.drain()
    return reader, writer


async def alice_in_flight(client: Any) -> int:
    async with client.get("/v1/usage", headers={
            "Authorization": f"Bearer {TOKENS['alice']}"}) as r:
        return int((await r.json())["limits"]["max_concurrent"]["used"])


async def test_a_member_at_max_concurrent_is_refused_with_the_body_unread(
        gateway_client: Any) -> None:
    """Item 2: admission comes before the body. With one request in flight (its body
    still arriving) a second gets 429 while its own body is mostly unsent; before, the
    gateway waited to read all of it (then 600 held-open uploads held 600 bodies)."""
    client = await gateway_client(quota_defaults={"max_concurrent": 1},
                                  server={"read_timeout_seconds": 600})
    port = client.server.port
    body = multipart_body({"n": "1", "size": "256x256"}, png_bytes(64), BOUNDARY)
    first = await held_upload(port, body, 100)

    async def admitted() -> bool:
        return await alice_in_flight(client) == 1

    await eventually(admitted, "the first upload holds alice's in-flight slot", DEADLINE)
    reader, second = await held_upload(port, body, 100)
    status = await asyncio.wait_for(reader.readline(), DEADLINE)
    assert status.startswith(b"HTTP/1.1 429"), status
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)).decode()
    length = int(re.search(r"(?im)^content-length: (\d+)", head).group(1))
    answer = await asyncio.wait_for(reader.readexactly(length), DEADLINE)
    assert b'"code":"rate_limit_exceeded"' in answer.replace(b" ", b"")
    for _, writer in (first, (reader, second)):
        writer.close()

    async def given_back() -> bool:  # the held upload's slot, when its client goes
        return await alice_in_flight(client) == 0

    await eventually(given_back, "the slot is given back", DEADLINE)


async def test_past_the_upload_budget_a_request_gets_503_server_busy(
        gateway_client: Any) -> None:
    """Item 2: the bytes being read at once are bounded across all clients. One held
    upload takes the whole (small) budget; another waits its bounded time, then gets
    503 ``server_busy`` with retry-after in the OpenAI envelope; once the budget is free
    the same request succeeds."""
    client = await gateway_client(server={"upload_budget_bytes": 50_000,
                                          "upload_wait_seconds": 0.2,
                                          "read_timeout_seconds": 600})
    budget = client.server.app[UPLOAD_BUDGET]
    big = multipart_body({"n": "1"}, png_bytes(64) + b"\0" * 60_000, BOUNDARY)
    _, holder = await held_upload(client.server.port, big, 1000)

    async def full() -> bool:
        return budget.used == budget.limit

    await eventually(full, "the held upload holds the whole budget", DEADLINE)
    form = aiohttp.FormData()
    form.add_field("image", png_bytes(32), filename="a.png", content_type="image/png")
    form.add_field("size", "256x256")
    headers = {"Authorization": f"Bearer {TOKENS['bob']}"}
    async with client.post("/v1/images/variations", data=form, headers=headers) as r:
        assert r.status == 503
        assert r.headers["retry-after"] == "1"
        error = (await r.json())["error"]
    assert error["code"] == "server_busy" and error["type"] == "server_error"
    assert set(error) == {"message", "type", "param", "code"}
    holder.close()

    async def free() -> bool:
        return budget.used == 0

    await eventually(free, "the budget is given back when the held upload's client goes",
                     DEADLINE)
    async with client.post("/v1/images/variations", data=form, headers=headers) as r:
        assert r.status == 200, await r.text()


async def test_the_budget_grants_in_arrival_order_and_gives_back_what_gave_up() -> None:
    """A waiter that fits is not overtaken by a later smaller one... and a waiter that
    is cancelled or times out leaves the budget as it was."""
    budget = UploadBudget(100, wait_seconds=60)
    order: list[str] = []
    release = asyncio.Event()

    async def take(name: str, size: int) -> None:
        async with budget.hold(size):
            order.append(name)
            await release.wait()

    first = asyncio.create_task(take("first", 80))
    await eventually(lambda: budget.used == 80, "first holds 80", DEADLINE)
    big = asyncio.create_task(take("big", 60))
    small = asyncio.create_task(take("small", 10))  # fits now, but big came first
    gone = asyncio.create_task(take("gone", 10))
    await eventually(lambda: len(budget._waiting) == 3, "three wait", DEADLINE)
    gone.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await gone
    assert order == ["first"] and budget.used == 80
    release.set()
    await asyncio.gather(first, big, small)
    assert order == ["first", "big", "small"] and budget.used == 0

    timed = UploadBudget(10, wait_seconds=0)
    async with timed.hold(10):
        with pytest.raises(Exception) as exc:
            async with timed.hold(1):
                pass
        assert getattr(exc.value, "code", None) == "server_busy"
    assert timed.used == 0
    async with timed.hold(10):  # granted at once, as only with no waiter left behind
        pass


def _wait_closed(sock: socket.socket, what: str) -> None:
    """Wait until the server has closed ``sock`` (EOF or reset): each look waits 0.1 s."""
    def closed() -> bool:
        try:
            return sock.recv(65536) == b""
        except TimeoutError:
            return False
        except ConnectionError:
            return True

    sock.settimeout(0.1)
    eventually_sync(closed, what, DEADLINE, interval_s=0)


def _lowered_soft_fd_limit() -> contextlib.AbstractContextManager[int]:
    @contextlib.contextmanager
    def lowered() -> Any:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        low = 256 if hard == resource.RLIM_INFINITY or hard > 256 else hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
        try:
            yield hard
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return lowered()


def test_the_serving_process_raises_its_soft_open_files_limit(
        gateway_process: Callable[..., Any]) -> None:
    """Item 3: started with a low soft limit (as some service managers do), ``serve``
    raises it to the hard limit, and says so."""
    with _lowered_soft_fd_limit() as hard:
        g = gateway_process()
    limits = Path(f"/proc/{g.proc.pid}/limits").read_text()
    found = re.search(r"Max open files\s+(\S+)\s+(\S+)", limits)
    assert found is not None, limits
    if hard == resource.RLIM_INFINITY:
        assert found.group(2) == "unlimited" and int(found.group(1)) > 256
    else:
        assert found.group(1) == found.group(2) == str(hard), limits
    assert "open files: up to" in g.log()


def test_silent_sockets_partial_headers_and_idle_keepalives_are_closed(
        gateway_process: Callable[..., Any]) -> None:
    """Item 3, in a real ``serve`` process: a socket that sends nothing, one that sends
    half a header, and a kept-alive one idle after its answer are all closed by the
    server (before, each stayed open for aiohttp's 3630 s, tokens or not)."""
    g = gateway_process(server={"header_timeout_seconds": 1, "keepalive_timeout_seconds": 1})
    port = int(g.url.rsplit(":", 1)[1])
    silent = socket.create_connection(("127.0.0.1", port))
    partial = socket.create_connection(("127.0.0.1", port))
    partial.sendall(b"POST /v1/images/variations HTTP/1.1\r\nHost: 127.0.0.1\r\nCont")
    idle = socket.create_connection(("127.0.0.1", port))
    idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    try:
        _wait_closed(silent, "a socket that sent nothing closed")
        _wait_closed(partial, "a socket that sent half a header closed")
        idle.settimeout(DEADLINE)
        assert idle.recv(65536).startswith(b"HTTP/1.1 200")
        _wait_closed(idle, "an idle keep-alive connection closed")
    finally:
        for s in (silent, partial, idle):
            s.close()
    # The gateway still serves.
    with socket.create_connection(("127.0.0.1", port)) as fresh:
        fresh.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        fresh.settimeout(DEADLINE)
        assert fresh.recv(65536).startswith(b"HTTP/1.1 200")
