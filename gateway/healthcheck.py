"""``variations-gateway healthcheck``: is the gateway of this config alive?

A container's HEALTHCHECK (or any supervisor) runs it beside the server: it reads the
same config the server reads (``--config``, else ``$VARIATIONS_GATEWAY_CONFIG``, else the
defaults), so a changed port or TLS is followed, where a probe hard-wired to
``http://127.0.0.1:8080`` said "unhealthy" for ``serve --port 9000`` and "healthy" for a
gateway bound where nobody could reach it. It asks ``/healthz`` on loopback; with TLS it
does not verify the certificate, which names the public host, not 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import ssl
import urllib.error
import urllib.request

from gateway.config import Config

TIMEOUT_SECONDS = 2.0


def target(config: Config, host: str | None = None, port: int | None = None) -> str:
    """The ``/healthz`` URL of the server ``config`` describes, seen from this machine."""
    host = host or config.server.host
    if host in ("0.0.0.0", ""):  # every interface: loopback is one of them
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass  # a name
    scheme = "https" if config.server.tls else "http"
    return f"{scheme}://{host}:{port or config.server.port}/healthz"


def probe(url: str, timeout: float = TIMEOUT_SECONDS) -> str | None:
    """``None`` when ``url`` answers 200, else one sentence saying what happened."""
    context = None
    if url.startswith("https://"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # our own server, on loopback
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as r:
            status = r.status
    except urllib.error.HTTPError as exc:
        exc.close()
        return f"{url} answered HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{url} did not answer ({reason})"
    return None if status == 200 else f"{url} answered HTTP {status}"
