"""Graceful shutdown of a real gateway process with a request in flight upstream.

On SIGTERM the gateway stops accepting connections at once, lets requests in flight
finish (here: one held at a fake upstream) and exits; past
``server.shutdown_timeout_seconds`` it exits anyway.
"""

from __future__ import annotations

import asyncio
import base64
import signal
from typing import Any

import aiohttp
import pytest
from fakes_upstreams import OpenAIVariationsFake
from instrumented_backend import variation_form
from support import TOKENS, GatewayProcess, eventually, png_bytes
from upstream_cases import GATEWAY_UPSTREAM, backend_entry


async def post(session: aiohttp.ClientSession, gateway: GatewayProcess
               ) -> tuple[int, dict[str, Any] | None]:
    async with session.post(gateway.url + "/v1/images/variations",
                            data=variation_form(png_bytes(64), n=2),
                            headers={"Authorization": f"Bearer {TOKENS['alice']}"}) as r:
        return r.status, await r.json()


async def refuses_connections(gateway: GatewayProcess) -> bool:
    host, port = gateway.url.removeprefix("http://").split(":")
    try:
        _, writer = await asyncio.open_connection(host, int(port))
    except OSError:
        return True
    writer.close()
    return False


async def wait_refused(gateway: GatewayProcess) -> None:
    await eventually(lambda: refuses_connections(gateway), "connections refused", 20.0)


async def test_sigterm_finishes_the_request_in_flight(
        gateway_process: Any, held_upstream: tuple[OpenAIVariationsFake, str]) -> None:
    fake, url = held_upstream
    gateway = gateway_process(backends=[backend_entry("openai", url, **GATEWAY_UPSTREAM)],
                              route=["up"],
                              server={"shutdown_timeout_seconds": 30})
    async with aiohttp.ClientSession() as session:
        in_flight = asyncio.create_task(post(session, gateway))
        await eventually(lambda: fake.arrived == 1, "the request held at the upstream")
        gateway.proc.send_signal(signal.SIGTERM)
        await wait_refused(gateway)  # stopped accepting while the request is in flight
        assert not in_flight.done()
        fake.gate.set()
        status, body = await asyncio.wait_for(in_flight, 20)
    assert status == 200 and body is not None
    assert [len(base64.b64decode(d["b64_json"])) > 0 for d in body["data"]] == [True] * 2
    assert await asyncio.to_thread(gateway.proc.wait, 30) == 0
    assert "shutting down" in gateway.log()


async def test_shutdown_deadline_bounds_a_stuck_request(
        gateway_process: Any, held_upstream: tuple[OpenAIVariationsFake, str]) -> None:
    fake, url = held_upstream
    gateway = gateway_process(backends=[backend_entry("openai", url, timeout_seconds=60,
                                                      **GATEWAY_UPSTREAM)],
                              route=["up"], server={"shutdown_timeout_seconds": 0.5})
    async with aiohttp.ClientSession() as session:
        in_flight = asyncio.create_task(post(session, gateway))
        await eventually(lambda: fake.arrived == 1, "the request held at the upstream")
        gateway.proc.send_signal(signal.SIGTERM)
        # The upstream never answers; the process still exits, well before the
        # backend's own 60 s timeout.
        assert await asyncio.to_thread(gateway.proc.wait, 20) == 0
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(in_flight, 20)
