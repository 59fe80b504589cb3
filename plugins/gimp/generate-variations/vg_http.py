"""HTTP transport of Generate Variations: how a call reaches the gateway and what comes back.

Standard library only (GIMP bundles its own Python on Windows and macOS): ``urllib`` with a
timeout on every call, caps on what is read into memory, and every outcome but a 2xx
answer raised as a :class:`vg_errors.GatewayError` sentence.

Two rules keep the member's token where it belongs. The API calls follow no redirect: a
3xx answer becomes a sentence naming its target, so the token is never replayed to
another host or port (urllib would follow 301/302/303/307/308 and keep the header). Image
downloads may follow redirects, but the token rides as an *unredirected* header, which
urllib never copies to a redirect target, and is only ever set for the gateway's own
origin. TLS uses the OS trust store plus an optional studio CA file (``ca_file``).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from email.message import Message
from typing import Any

from vg_errors import (
    SETTINGS_HINT,
    GatewayError,
    error_sentence,
    lower_headers,
    redirected,
    too_large,
    transport_error,
)

USER_AGENT = "generate-variations-gimp/1.0"
# Caps on what is read into memory (a wrong URL can point at an endless or huge answer).
MAX_SMALL_ANSWER = 1024 * 1024  # usage and model answers, error bodies
MAX_DOWNLOAD_REDIRECTS = 5


def api_base(url: str) -> str:
    """The ``.../v1`` base for a gateway URL given with or without ``/v1``."""
    u = (url or "").strip()
    if not u:
        raise GatewayError(
            f"No gateway URL is set: enter one in {SETTINGS_HINT} or set "
            "VARIATIONS_GATEWAY_URL.", kind="settings")
    if "://" not in u:
        u = "http://" + u
    try:
        parts = urllib.parse.urlsplit(u)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise GatewayError(
            f"The gateway URL {url!r} is not a valid address (check the host and port); fix "
            f"it in {SETTINGS_HINT}.", kind="settings") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise GatewayError(
            f"The gateway URL {url!r} is not an http:// or https:// address; fix it in "
            f"{SETTINGS_HINT}.", kind="settings")
    path = parts.path.rstrip("/")
    if not path.endswith("/v1"):
        path += "/v1"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def ssl_context(ca_file: str | None = None) -> ssl.SSLContext:
    """Verification against the OS trust store, plus the studio's CA file when one is set.

    The CA file adds to the OS store rather than replacing it, so image URLs on a public
    host (a CDN) still verify. Python builds whose default paths are empty on macOS (the
    python.org kind GIMP may bundle) also get the system roots from ``/etc/ssl/cert.pem``.
    """
    ctx = ssl.create_default_context()
    if sys.platform == "darwin" and not ctx.get_ca_certs() \
            and os.path.isfile("/etc/ssl/cert.pem"):
        with contextlib.suppress(OSError, ssl.SSLError):
            ctx.load_verify_locations(cafile="/etc/ssl/cert.pem")
    path = os.path.expanduser((ca_file or "").strip())
    if path:
        try:
            ctx.load_verify_locations(cafile=path)
        except (OSError, ssl.SSLError, ValueError) as e:
            # SSLError is an OSError too; its strerror is OpenSSL's jargon.
            why = e.strerror if not isinstance(e, ssl.SSLError) \
                and isinstance(e, OSError) and e.strerror else "it holds no PEM certificate"
            raise GatewayError(
                f"The CA file {path} cannot be used ({why.lower()}). Choose your studio's "
                f"CA certificate (a PEM file) in {SETTINGS_HINT}, or clear the field to use "
                "the system's certificates.", kind="settings") from None
    return ctx


class _DownloadRedirects(urllib.request.HTTPRedirectHandler):
    """Redirect policy. Requests marked ``follow_redirects = False`` (the API calls) follow
    none: the 3xx comes back as an HTTPError that :func:`call` turns into a sentence. Image
    downloads follow a few, to http(s) targets only (never ftp:// or file:), and the token
    is an unredirected header, so it is not carried to any redirect target."""

    max_redirections = MAX_DOWNLOAD_REDIRECTS

    def redirect_request(  # type: ignore[override]
        self, req: urllib.request.Request, fp: Any, code: int, msg: str,
        headers: Message, newurl: str,
    ) -> urllib.request.Request | None:
        if not getattr(req, "follow_redirects", False):
            return None
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            return None
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.follow_redirects = True  # type: ignore[attr-defined]
        return new


def _opener(ca_file: str | None) -> urllib.request.OpenerDirector:
    # Replaces urllib's redirect handler and HTTPS handler; the rest (proxies from the
    # environment, ...) stays as urlopen has it.
    return urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=ssl_context(ca_file)),
        _DownloadRedirects(),
    )


def read_capped(resp: Any, cap: int, url: str) -> bytes:
    """At most ``cap`` bytes of ``resp``'s body, or :class:`GatewayError`. A declared
    Content-Length over the cap is refused before reading; a body with a length is read
    whole (so a cut-off one still raises IncompleteRead); one without (chunked, or until
    the connection closes) is read up to one byte past the cap."""
    length = getattr(resp, "length", None)
    if isinstance(length, int):
        if length > cap:
            raise too_large(url, cap)
        return bytes(resp.read())
    data = resp.read(cap + 1)
    if len(data) > cap:
        raise too_large(url, cap)
    return bytes(data)


def call(
    req: urllib.request.Request,
    url: str,
    timeout: float,
    *,
    ca_file: str | None = None,
    cap: int,
) -> tuple[bytes, dict[str, str]]:
    """Send ``req``; the body (at most ``cap`` bytes) and headers of a 2xx answer. Every
    other outcome (an HTTP error status, a redirect on an API call, a dead or wrong server,
    a broken, oversized or non-HTTP answer) raises :class:`GatewayError`; nothing else
    escapes."""
    opener = _opener(ca_file)
    try:
        with opener.open(req, timeout=timeout) as resp:
            return read_capped(resp, cap, url), lower_headers(resp.headers)
    except urllib.error.HTTPError as e:
        with contextlib.closing(e):  # an unclosed HTTPError leaks its socket
            if 300 <= e.code < 400:
                raise redirected(e, url) from None
            try:
                body = read_capped(e.fp, MAX_SMALL_ANSWER, url) if e.fp is not None else b""
            except (OSError, ValueError, http.client.HTTPException, GatewayError):
                body = b""  # too large or cut off: judged by status and headers alone
            raise error_sentence(e.code, body, e.headers, url) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        raise transport_error(e, url, timeout) from None


def _check_token(token: str) -> None:
    if token and not all("!" <= ch <= "~" for ch in token):
        # http.client would refuse it with an error that quotes the whole header value.
        raise GatewayError(
            "The token contains a space, a line break or another character a token cannot "
            f"have; enter it again in {SETTINGS_HINT} (or fix VARIATIONS_GATEWAY_TOKEN).",
            kind="settings")


def request(
    url: str,
    token: str,
    *,
    data: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    method: str = "GET",
    follow_redirects: bool = False,
) -> urllib.request.Request:
    """A request carrying ``token`` as an unredirected header: urllib never copies such a
    header to a redirect target, whatever the redirect policy."""
    _check_token(token)
    h = {"Accept": "application/json", "User-Agent": USER_AGENT, **(headers or {})}
    req = urllib.request.Request(url, data=data, headers=h, method=method)
    if token:
        req.add_unredirected_header("Authorization", f"Bearer {token}")
    req.follow_redirects = follow_redirects  # type: ignore[attr-defined]
    return req




def get_json(base_url: str, path: str, token: str, timeout: float, what: str,
             ca_file: str | None = None) -> Any:
    """``GET {base}/v1{path}``, a small JSON answer (usage, the model list); one that
    cannot be read is a :class:`GatewayError` naming ``what`` it should have been."""
    url = api_base(base_url) + path
    raw, _ = call(request(url, token), url, timeout, ca_file=ca_file, cap=MAX_SMALL_ANSWER)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise GatewayError(f"The gateway at {url} sent {what} GIMP cannot read ({e}).",
                           kind="protocol") from None
