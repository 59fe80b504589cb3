"""HTTP client of Generate Variations for the variations gateway.

Standard library only (GIMP bundles its own Python on Windows and macOS): ``urllib``,
a multipart body built by hand, a timeout on every call, and every failure turned into
one sentence a user can act on (:class:`GatewayError`), built from the gateway's OpenAI
error envelope ``{"error": {"message", "type", "param", "code"}}`` and its headers.

Two rules keep the member's token where it belongs. The API calls follow no redirect: a
3xx answer becomes a sentence naming its target, so the token is never replayed to
another host or port (urllib would follow 301/302/303/307/308 and keep the header). Image
downloads may follow redirects, but the token rides as an *unredirected* header, which
urllib never copies to a redirect target, and is only ever set for the gateway's own
origin. TLS uses the OS trust store plus an optional studio CA file (``ca_file``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import json
import os
import socket
import ssl
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

USER_AGENT = "generate-variations-gimp/1.0"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_UPLOAD = 4 * 1024 * 1024
# Caps on what is read into memory (a wrong URL can point at an endless or huge answer).
# A variations answer holds up to 10 base64 PNGs of 1024x1024 (a few MB each).
MAX_ANSWER = 96 * 1024 * 1024
MAX_DOWNLOAD = 32 * 1024 * 1024  # one image fetched from a url item
MAX_SMALL_ANSWER = 1024 * 1024  # usage answers and error bodies
MAX_DOWNLOAD_REDIRECTS = 5
CA_FILE_ENV = "VARIATIONS_GATEWAY_CA_FILE"
SETTINGS_HINT = "Filters > Generate Variations Settings"


class GatewayError(Exception):
    """A failed gateway call. ``str(err)`` is the sentence for the user."""

    def __init__(
        self,
        sentence: str,
        *,
        status: int | None = None,
        code: str | None = None,
        kind: str = "error",
        request_id: str | None = None,
    ) -> None:
        super().__init__(sentence)
        self.sentence = sentence
        self.status = status
        self.code = code
        self.kind = kind
        self.request_id = request_id


@dataclass
class VariationsResult:
    images: list[bytes]
    request_id: str | None = None
    cache: str | None = None
    created: int | None = None
    headers: dict[str, str] = field(default_factory=dict)


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


def build_multipart(
    fields: Mapping[str, str],
    files: list[tuple[str, str, str, bytes]],
    boundary: str | None = None,
) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body: text ``fields`` then ``files`` given as
    ``(field name, file name, content type, bytes)``. Returns ``(body, content type)``."""
    b = boundary or ("----generate-variations-" + uuid.uuid4().hex)
    out: list[bytes] = []

    def quote(s: str) -> str:
        return s.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "").replace("\n", "")

    for name, value in fields.items():
        out.append(f"--{b}\r\n".encode())
        out.append(f'Content-Disposition: form-data; name="{quote(name)}"\r\n\r\n'.encode())
        out.append(str(value).encode("utf-8"))
        out.append(b"\r\n")
    for name, filename, ctype, data in files:
        out.append(f"--{b}\r\n".encode())
        out.append(
            f'Content-Disposition: form-data; name="{quote(name)}"; '
            f'filename="{quote(filename)}"\r\n'.encode()
        )
        out.append(f"Content-Type: {ctype}\r\n\r\n".encode())
        out.append(data)
        out.append(b"\r\n")
    out.append(f"--{b}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={b}"


def _headers(msg: Message | Mapping[str, str] | None) -> dict[str, str]:
    if msg is None:
        return {}
    return {k.lower(): v for k, v in msg.items()}


def _seconds_text(value: str) -> str:
    """``"12"`` -> ``"12 seconds"``; ``"1"`` -> ``"1 second"``."""
    try:
        s = int(float(value) + 0.999)
    except ValueError:
        return value
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60} min"
    if s >= 120:
        return f"{(s + 59) // 60} minutes"
    return f"{s} second" + ("" if s == 1 else "s")


def _envelope(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return data["error"]
    return None


def error_sentence(
    status: int,
    body: bytes,
    headers: Mapping[str, str] | Message | None,
    url: str,
) -> GatewayError:
    """Turn an HTTP error answer of the gateway into a :class:`GatewayError`."""
    h = _headers(headers)
    err = _envelope(body)
    message = str(err.get("message") or "").strip() if err else ""
    code = err.get("code") if err else None
    param = err.get("param") if err else None
    rid = h.get("x-request-id")
    ref = f" (request id {rid})" if rid else ""

    def make(sentence: str, kind: str) -> GatewayError:
        return GatewayError(sentence, status=status, code=code, kind=kind, request_id=rid)

    if err is None:
        if status == 404:
            return make(
                f"There is no variations gateway at {url} (HTTP 404): check the gateway URL "
                f"in {SETTINGS_HINT}.", "not_found")
        reason = {502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}.get(
            status, "")
        return make(
            f"The gateway at {url} answered HTTP {status} {reason}".rstrip()
            + " without an error message; something between GIMP and the gateway (a proxy?) "
            f"may be failing, or the URL is wrong. Check {SETTINGS_HINT}.",
            "backend" if status >= 500 else "http")

    if status == 401:
        if code == "invalid_api_key":
            return make(
                f"The gateway rejected your token: it is wrong or was revoked. Enter the "
                f"token your gateway admin gave you in {SETTINGS_HINT}.", "auth")
        return make(
            f"The gateway needs a token and none was sent. Enter your token in {SETTINGS_HINT} "
            "(or set VARIATIONS_GATEWAY_TOKEN).", "auth")
    if status == 403:
        if code == "user_blocked":
            return make(
                "Your gateway account is blocked, so no images can be made. Ask the gateway "
                f"admin to unblock you.{ref}", "blocked")
        return make(f"The gateway refused this request: {message}{ref}", "forbidden")
    if status == 429:
        limit = h.get("x-ratelimit-limit-images")
        remaining = h.get("x-ratelimit-remaining-images")
        reset = h.get("x-ratelimit-reset-images")
        retry = h.get("retry-after")
        if code == "quota_exceeded":
            left = ""
            if remaining is not None and limit is not None:
                left = f" {remaining} of {limit} images are left"
            elif remaining is not None:
                left = f" {remaining} images are left"
            when = ""
            if reset:
                when = f"; it resets in {reset}"
            elif retry:
                when = f"; it resets in {_seconds_text(retry)}"
            what = f"{left}{when}".lstrip("; ").strip()
            sentence = "Your image quota on the gateway is used up"
            if what:
                sentence += f": {what}"
            sentence += ". Ask for fewer variations, or wait until it resets."
            return make(sentence, "quota")
        wait = f" Wait {_seconds_text(retry)} and try again." if retry else " Wait a moment " \
            "and try again."
        return make(f"Too many requests to the gateway right now ({message.rstrip('.')})."
                    f"{wait}", "rate")
    if status == 400 or status == 413 or status == 422:
        what = f" (parameter '{param}')" if param else ""
        return make(f"The gateway refused the request{what}: {message}", "bad_request")
    if status == 404:
        return make(
            f"There is no variations endpoint at {url} (HTTP 404: {message}). Check the "
            f"gateway URL in {SETTINGS_HINT}.", "not_found")
    if status == 504 or code == "upstream_timeout":
        return make(
            "The image backend behind the gateway took too long and the gateway gave up. Try "
            f"again, or ask for fewer or smaller variations.{ref}", "timeout")
    if code == "storage_unavailable":
        return make(
            "The gateway cannot store images right now: its disk is full or its storage is "
            f"failing. Nothing was charged. Tell the gateway admin.{ref}", "server")
    if code == "state_unavailable":
        retry = h.get("retry-after")
        later = f"Try again in {_seconds_text(retry)}" if retry else "Try again shortly"
        return make(
            "The gateway cannot reach its shared state store (Redis), so it cannot check "
            f"quotas and makes no images for now. Nothing was charged. {later}; if it keeps "
            f"happening, tell the gateway admin.{ref}", "state")
    if status in (502, 503) or code in ("upstream_error", "upstream_unavailable"):
        retry = h.get("retry-after")
        later = f" Try again in {_seconds_text(retry)}." if retry else " Try again later."
        detail = f" ({message.rstrip('.')})" if message else ""
        return make(
            f"The gateway's image backend is down or failing{detail}.{later}{ref}", "backend")
    if status >= 500:
        return make(f"The gateway failed (HTTP {status}): {message}{ref}", "server")
    return make(f"The gateway refused the request (HTTP {status}): {message}{ref}", "http")


def _not_a_gateway(url: str) -> GatewayError:
    return GatewayError(
        f"The server at {url} did not answer like a variations gateway (is the URL right?). "
        f"Check the gateway URL in {SETTINGS_HINT}.", kind="protocol")


def _transport_error(exc: BaseException, url: str, timeout: float) -> GatewayError:
    """Any failure below HTTP status level (connection, TLS, a broken or non-HTTP answer)
    as a sentence. Never quotes what the server sent, so nothing echoed back (the token)
    can end up in the message."""
    # Only URLError wraps the cause in .reason (SSLError's .reason is OpenSSL's text).
    reason: Any = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, (TimeoutError, socket.timeout)) or isinstance(exc, TimeoutError):
        return GatewayError(
            f"The gateway at {url} did not answer within {timeout:g} seconds. It may be busy: "
            "try again, ask for fewer variations, or raise the timeout in "
            f"{SETTINGS_HINT}.", kind="timeout")
    if isinstance(reason, http.client.IncompleteRead):
        got = len(reason.partial or b"")
        more = f", {reason.expected} more were expected" if reason.expected else ""
        return GatewayError(
            f"The answer of the gateway at {url} was cut off (got {got} bytes{more}): the "
            "connection broke, or something between GIMP and the gateway (a proxy?) is "
            f"failing. Try again; if it keeps happening, check the URL in {SETTINGS_HINT}.",
            kind="protocol")
    if isinstance(reason, http.client.RemoteDisconnected):
        return GatewayError(
            f"The server at {url} closed the connection without answering: it may not be a "
            f"variations gateway (is the URL right?). Check the gateway URL in "
            f"{SETTINGS_HINT}.", kind="protocol")
    if isinstance(reason, http.client.InvalidURL):
        return GatewayError(
            f"The gateway URL {url} is not valid; fix it in {SETTINGS_HINT}.", kind="settings")
    if isinstance(reason, http.client.HTTPException):
        # BadStatusLine, LineTooLong, UnknownProtocol, ...: not HTTP, or not a sane one.
        return _not_a_gateway(url)
    if isinstance(reason, ssl.SSLCertVerificationError):
        return _untrusted(reason, url)
    if isinstance(reason, ssl.SSLError):
        return GatewayError(
            f"A secure connection to the gateway at {url} failed ({reason}). Check the URL "
            f"(http:// or https://) in {SETTINGS_HINT}.", kind="unreachable")
    if isinstance(reason, socket.gaierror):
        return GatewayError(
            f"Could not reach the variations gateway at {url}: the host name is unknown. "
            f"Check the gateway URL in {SETTINGS_HINT}.", kind="unreachable")
    if isinstance(reason, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        why = (reason.strerror or "the connection was reset").lower()
        return GatewayError(
            f"The connection to the server at {url} broke ({why}): it may not be a "
            f"variations gateway, or it stopped. Try again, and check the URL in "
            f"{SETTINGS_HINT}.", kind="unreachable")
    if isinstance(reason, ConnectionRefusedError):
        why = "nothing is listening there (connection refused)"
    elif isinstance(reason, OSError) and reason.strerror:
        why = reason.strerror.lower()
    else:
        why = str(reason) or type(reason).__name__
    return GatewayError(
        f"Could not reach the variations gateway at {url}: {why}. Check that it is running "
        f"and that the URL in {SETTINGS_HINT} is right.", kind="unreachable")


# X509_V_ERR_* codes OpenSSL reports in SSLCertVerificationError.verify_code.
_X509_CERT_HAS_EXPIRED = 10
_X509_HOSTNAME_MISMATCH = 62


def _untrusted(err: ssl.SSLCertVerificationError, url: str) -> GatewayError:
    """A certificate that failed verification. The usual case in a studio is a private
    CA: say so plainly, so nobody "fixes" it by switching to http://, where the token
    would travel in the clear."""
    code = getattr(err, "verify_code", None)
    if code == _X509_HOSTNAME_MISMATCH:
        return GatewayError(
            f"A secure connection to the gateway at {url} failed: its certificate is for "
            f"another host name. Use the host name the certificate names in {SETTINGS_HINT}.",
            kind="untrusted")
    if code == _X509_CERT_HAS_EXPIRED:
        return GatewayError(
            f"A secure connection to the gateway at {url} failed: its certificate has "
            "expired. Tell the gateway admin.", kind="untrusted")
    return GatewayError(
        f"A secure connection to the gateway at {url} failed: the certificate is not "
        f"trusted: add your studio's CA file in Settings ({SETTINGS_HINT}, or "
        f"{CA_FILE_ENV}). Do not switch to http://: the token would travel in the clear.",
        kind="untrusted")


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
    none: the 3xx comes back as an HTTPError that :func:`_call` turns into a sentence. Image
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


def _too_large(url: str, cap: int) -> GatewayError:
    return GatewayError(
        f"The answer of the server at {url} is larger than {cap / 1048576:g} MB, far more "
        f"than a variations gateway sends; GIMP stopped reading it. Check the gateway URL in "
        f"{SETTINGS_HINT}.", kind="protocol")


def _read_capped(resp: Any, cap: int, url: str) -> bytes:
    """At most ``cap`` bytes of ``resp``'s body, or :class:`GatewayError`. A declared
    Content-Length over the cap is refused before reading; a body with a length is read
    whole (so a cut-off one still raises IncompleteRead); one without (chunked, or until
    the connection closes) is read up to one byte past the cap."""
    length = getattr(resp, "length", None)
    if isinstance(length, int):
        if length > cap:
            raise _too_large(url, cap)
        return bytes(resp.read())
    data = resp.read(cap + 1)
    if len(data) > cap:
        raise _too_large(url, cap)
    return bytes(data)


def _redirect_target(e: urllib.error.HTTPError, url: str) -> str:
    """Where a 3xx points, for the sentence: absolute, without user info, query or
    fragment (a signed query is no help to an admin fixing the URL), printable, short."""
    loc = (e.headers.get("location") or e.headers.get("uri") or "") if e.headers else ""
    if not loc.strip():
        return "an address it did not give"
    try:
        parts = urllib.parse.urlsplit(urllib.parse.urljoin(url, loc.strip()))
        host = parts.netloc.rpartition("@")[2]
        target = urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))
    except ValueError:
        return "an address that is not valid"
    target = "".join(ch for ch in target if ch.isprintable())
    return target if len(target) <= 200 else target[:200] + "..."


def _redirected(e: urllib.error.HTTPError, url: str) -> GatewayError:
    target = _redirect_target(e, url)
    return GatewayError(
        f"The gateway URL answered with a redirect (HTTP {e.code}) from {url} to {target}. "
        "GIMP does not follow redirects, so your token is never sent to another address: if "
        f"the gateway now lives there, enter that URL in {SETTINGS_HINT} (ask the gateway "
        "admin if unsure).", status=e.code, kind="redirect")


def _call(
    req: urllib.request.Request,
    url: str,
    timeout: float,
    *,
    ca_file: str | None = None,
    cap: int = MAX_ANSWER,
) -> tuple[bytes, dict[str, str]]:
    """Send ``req``; the body (at most ``cap`` bytes) and headers of a 2xx answer. Every
    other outcome (an HTTP error status, a redirect on an API call, a dead or wrong server,
    a broken, oversized or non-HTTP answer) raises :class:`GatewayError`; nothing else
    escapes."""
    opener = _opener(ca_file)
    try:
        with opener.open(req, timeout=timeout) as resp:
            return _read_capped(resp, cap, url), _headers(resp.headers)
    except urllib.error.HTTPError as e:
        with contextlib.closing(e):  # an unclosed HTTPError leaks its socket
            if 300 <= e.code < 400:
                raise _redirected(e, url) from None
            try:
                body = _read_capped(e.fp, MAX_SMALL_ANSWER, url) if e.fp is not None else b""
            except (OSError, ValueError, http.client.HTTPException, GatewayError):
                body = b""  # too large or cut off: judged by status and headers alone
            raise error_sentence(e.code, body, e.headers, url) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        raise _transport_error(e, url, timeout) from None


def _check_token(token: str) -> None:
    if token and not all("!" <= ch <= "~" for ch in token):
        # http.client would refuse it with an error that quotes the whole header value.
        raise GatewayError(
            "The token contains a space, a line break or another character a token cannot "
            f"have; enter it again in {SETTINGS_HINT} (or fix VARIATIONS_GATEWAY_TOKEN).",
            kind="settings")


def _request(
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


def request_variations(
    base_url: str,
    token: str,
    png: bytes,
    *,
    n: int,
    size: str,
    fresh: bool = False,
    timeout: float = 180.0,
    filename: str = "image.png",
    user: str | None = None,
    ca_file: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> VariationsResult:
    """``POST /v1/images/variations`` with ``response_format=b64_json``; returns the PNGs.
    ``ca_file``: a PEM file of the studio's CA, trusted besides the OS trust store.
    ``extra``: the gateway's own fields (model, strength, seed, prompt; vg_steer)."""
    if not png.startswith(PNG_SIGNATURE):
        raise GatewayError("Internal error: the prepared upload is not a PNG.", kind="client")
    if len(png) >= MAX_UPLOAD:
        raise GatewayError(
            f"The prepared image is {len(png) / 1048576:.1f} MB; the gateway takes less than "
            "4 MB. Choose a smaller size.", kind="client")
    url = api_base(base_url) + "/images/variations"
    fields = {"n": str(int(n)), "size": size, "response_format": "b64_json"}
    if user:
        fields["user"] = user
    fields.update(extra or {})
    body, ctype = build_multipart(fields, [("image", filename, "image/png", png)])
    headers = {"Content-Type": ctype}
    if fresh:
        headers["Cache-Control"] = "no-cache"
    req = _request(url, token, data=body, headers=headers, method="POST")
    raw, h = _call(req, url, timeout, ca_file=ca_file, cap=MAX_ANSWER)
    rid = h.get("x-request-id")
    try:
        data = json.loads(raw.decode("utf-8"))
        items = data["data"]
        images = []
        for item in items:
            if item.get("b64_json"):
                images.append(base64.b64decode(item["b64_json"], validate=True))
            elif item.get("url"):
                images.append(_download(item["url"], url, token, timeout, ca_file))
            else:
                raise ValueError("an item has neither b64_json nor url")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError,
            binascii.Error) as e:
        raise GatewayError(
            f"The gateway at {url} sent an answer GIMP cannot read ({e}); is the URL that of "
            f"a variations gateway?", kind="protocol", request_id=rid) from None
    if not images:
        raise GatewayError("The gateway returned no images.", kind="protocol", request_id=rid)
    for img in images:
        if not img.startswith(PNG_SIGNATURE):
            raise GatewayError("The gateway returned an image that is not a PNG.",
                               kind="protocol", request_id=rid)
    return VariationsResult(images, rid, h.get("x-cache"), data.get("created"), h)


def _download(
    image_url: str, api_url: str, token: str, timeout: float, ca_file: str | None = None
) -> bytes:
    full = urllib.parse.urljoin(api_url, image_url)
    target, api = urllib.parse.urlsplit(full), urllib.parse.urlsplit(api_url)
    if target.scheme not in ("http", "https"):
        raise ValueError("an image url is not an http(s) address")
    # Image URLs are signed: the token goes only to the gateway itself, never to another
    # host a public_base_url (a CDN, say) points at.
    same_origin = (target.scheme, target.netloc) == (api.scheme, api.netloc)
    req = _request(full, token if same_origin else "", follow_redirects=True)
    raw, _ = _call(req, full, timeout, ca_file=ca_file, cap=MAX_DOWNLOAD)
    return raw


def get_usage(
    base_url: str, token: str, timeout: float = 10.0, ca_file: str | None = None
) -> dict[str, Any]:
    """``GET /v1/usage``: the user's limits and what is left."""
    url = api_base(base_url) + "/usage"
    req = _request(url, token)
    raw, _ = _call(req, url, timeout, ca_file=ca_file, cap=MAX_SMALL_ANSWER)
    try:
        data = json.loads(raw.decode("utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise GatewayError(
            f"The gateway at {url} sent a usage answer GIMP cannot read ({e}).",
            kind="protocol") from None
    return data


_LIMIT_WORDS = {
    "images_per_day": ("images", "today"),
    "images_per_month": ("images", "this month"),
    "requests_per_minute": ("requests", "this minute"),
}


def describe_usage(usage: Mapping[str, Any]) -> str:
    """One or two lines for the settings dialog, e.g. ``alice: 197 of 200 images left
    today (resets 2026-11-24T00:00:00Z).``"""
    user = usage.get("user") or "you"
    if usage.get("blocked"):
        return f"Connected as {user}, but the account is blocked: ask the gateway admin."
    parts = []
    limits = usage.get("limits")
    if not isinstance(limits, Mapping):
        limits = {}
    for key, (unit, period) in _LIMIT_WORDS.items():
        lim = limits.get(key)
        if not isinstance(lim, dict) or lim.get("limit") is None:
            continue
        text = f"{lim.get('remaining')} of {lim.get('limit')} {unit} left {period}"
        if lim.get("resets_at"):
            text += f" (resets {lim['resets_at']})"
        parts.append(text)
    if not parts:
        return f"Connected as {user}; no image limits apply."
    return f"Connected as {user}: " + "; ".join(parts) + "."


def usage_summary(
    url: str, token: str, timeout: float, ca_file: str | None = None
) -> str:
    """What Test Connection shows: the quota summary, or raise :class:`GatewayError`. The
    client turns every network and protocol failure into one; anything else still becomes
    a sentence, never a traceback in a dialog."""
    try:
        return describe_usage(
            get_usage(url, token, timeout=min(float(timeout), 15.0), ca_file=ca_file))
    except GatewayError:
        raise
    except Exception as e:
        raise GatewayError(
            f"Testing the connection failed unexpectedly ({type(e).__name__}).") from None


def call_in_background(
    fn: Callable[[], str], deliver: Callable[[str], object]
) -> threading.Thread:
    """Run ``fn`` (a blocking network call) in a daemon thread and hand its text, or the
    sentence of its failure, to ``deliver`` from that thread. Returns at once, so a dialog
    stays responsive while a gateway takes its time; the GTK side passes a ``deliver``
    that goes through ``GLib.idle_add`` (GTK widgets belong to the main thread)."""

    def work() -> None:
        try:
            text = fn()
        except GatewayError as e:
            text = str(e)
        except Exception as e:
            text = f"Testing the connection failed unexpectedly ({type(e).__name__})."
        deliver(text)

    t = threading.Thread(target=work, name="generate-variations-call", daemon=True)
    t.start()
    return t


def debug_dir() -> str | None:
    """``VARIATIONS_GATEWAY_DEBUG_DIR``: when set, the plug-in keeps its uploads there."""
    d = os.environ.get("VARIATIONS_GATEWAY_DEBUG_DIR", "").strip()
    return d or None
