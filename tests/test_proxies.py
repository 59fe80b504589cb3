"""The audited client address behind trusted proxies (X-Forwarded-For)."""

from __future__ import annotations

import re
from typing import Any
from unittest import mock

import pytest
from aiohttp.test_utils import make_mocked_request
from support import auth

from gateway.config import ConfigError, build_config
from gateway.keys import AUDIT
from gateway.proxies import ClientAddress


def request(peer: str, *forwarded: str) -> Any:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (peer, 40000) if name == "peername" else default)
    headers = [("X-Forwarded-For", value) for value in forwarded]
    return make_mocked_request("GET", "/", headers=headers, transport=transport)


@pytest.mark.parametrize(("peer", "forwarded", "client"), [
    # Not behind a trusted proxy: the header is the client's own claim, ignored.
    ("203.0.113.9", ["198.51.100.1"], "203.0.113.9"),
    # nginx in the compose network: the address it saw.
    ("172.18.0.3", ["198.51.100.1"], "198.51.100.1"),
    # A client forging the header: nginx appends the real address, which wins.
    ("172.18.0.3", ["6.6.6.6, 198.51.100.1"], "198.51.100.1"),
    # Two proxies (a load balancer, then nginx): the first untrusted hop from the right.
    ("172.18.0.3", ["198.51.100.1, 10.1.2.3"], "198.51.100.1"),
    ("172.18.0.3", ["198.51.100.1", "10.1.2.3"], "198.51.100.1"),  # repeated header
    # Garbage where an address should be: nothing beyond the proxy is believed.
    ("172.18.0.3", ["198.51.100.1, not-an-ip"], "172.18.0.3"),
    # No header, or only proxies in it.
    ("172.18.0.3", [], "172.18.0.3"),
    ("172.18.0.3", ["10.9.9.9, 10.1.2.3"], "10.9.9.9"),
    # A dual-stack socket's mapped address is the proxy's IPv4 one.
    ("::ffff:172.18.0.3", ["2001:db8::7"], "2001:db8::7"),
])
def test_client_address(peer: str, forwarded: list[str], client: str) -> None:
    addresses = ClientAddress(["172.16.0.0/12", "10.0.0.0/8"])
    assert addresses.of(request(peer, *forwarded)) == client


def test_nothing_trusted_by_default() -> None:
    assert ClientAddress([]).of(request("172.18.0.3", "198.51.100.1")) == "172.18.0.3"


def test_a_bad_entry_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=re.escape("'10.0.0.0/33'")):
        build_config({"server": {"trusted_proxies": ["10.0.0.0/8", "10.0.0.0/33"]}})


async def test_the_audit_records_the_forwarded_client(gateway_client: Any) -> None:
    for trusted, expected in (([], "127.0.0.1"), (["127.0.0.1"], "198.51.100.1")):
        client = await gateway_client(server={"trusted_proxies": trusted})
        async with client.get("/v1/usage", headers={
                **auth(), "X-Forwarded-For": "198.51.100.1"}) as r:
            assert r.status == 200
            request_id = r.headers["x-request-id"]
        (row,) = [row for row in client.app[AUDIT].query(limit=10)
                  if row["request_id"] == request_id]
        assert row["client"] == expected
        await client.close()
