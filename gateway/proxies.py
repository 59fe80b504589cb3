"""The client address the audit records: the peer, or what a trusted proxy says it was.

Behind nginx or an ingress (the compose and Kubernetes deployments) every peer is the
proxy, and "who sent this" would always answer with its address. When the peer is in
``server.trusted_proxies``, the client is the right-most ``X-Forwarded-For`` entry that
is not itself a trusted proxy: entries further left were written by the client and
prove nothing.

Hand-written rather than aiohttp-remotes: its middlewares also rewrite the request's
scheme and host, which would change the base of every signed image URL; the audit needs
only the address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from aiohttp import web

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """``10.0.0.0/8``, ``172.18.0.5`` or ``::1``; raises ValueError naming a bad one."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"trusted_proxies: {value!r} is not an IP address or network"
                             ) from None
    return tuple(networks)


def _address(text: str) -> Address | None:
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # ::ffff:10.0.0.1 from a dual-stack socket
    return ip


class ClientAddress:
    def __init__(self, trusted: Iterable[str]) -> None:
        self._trusted = parse_networks(trusted)

    def _is_trusted(self, ip: Address | None) -> bool:
        return ip is not None and any(ip in net for net in self._trusted)

    def of(self, request: web.Request) -> str | None:
        peer = request.remote
        if not self._trusted or peer is None or not self._is_trusted(_address(peer)):
            return peer
        hops = [hop for value in request.headers.getall("X-Forwarded-For", ())
                for hop in value.split(",")]
        for hop in reversed(hops):
            ip = _address(hop)
            if ip is None:
                return peer  # a hop that is no address: trust nothing beyond the proxy
            if not self._is_trusted(ip):
                return str(ip)
        first = _address(hops[0]) if hops else None  # every hop a proxy: the first one
        return str(first) if first is not None else peer
