"""HTTP client of Generate Variations for the variations gateway.

Standard library only (GIMP bundles its own Python on Windows and macOS): ``urllib``,
a multipart body built by hand, a timeout on every call, and every failure turned into
one sentence a user can act on (:class:`GatewayError`), built from the gateway's OpenAI
error envelope ``{"error": {"message", "type", "param", "code"}}`` and its headers.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import os
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

USER_AGENT = "generate-variations-gimp/1.0"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_UPLOAD = 4 * 1024 * 1024
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
    reason: Any = getattr(exc, "reason", exc)
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


def _call(
    req: urllib.request.Request, url: str, timeout: float
) -> tuple[bytes, dict[str, str]]:
    """Send ``req``; the body and headers of a 2xx answer. Every other outcome (an HTTP
    error status, a dead or wrong server, a broken or non-HTTP answer) raises
    :class:`GatewayError`; nothing else escapes."""
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read(), _headers(resp.headers)
    except urllib.error.HTTPError as e:
        try:
            body = e.read()
        except (OSError, ValueError, http.client.HTTPException):
            body = b""
        raise error_sentence(e.code, body, e.headers, url) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        raise _transport_error(e, url, timeout) from None


def _auth_headers(token: str) -> dict[str, str]:
    h = {"Accept": "application/json", "User-Agent": USER_AGENT}
    if token and not all("!" <= ch <= "~" for ch in token):
        # http.client would refuse it with an error that quotes the whole header value.
        raise GatewayError(
            "The token contains a space, a line break or another character a token cannot "
            f"have; enter it again in {SETTINGS_HINT} (or fix VARIATIONS_GATEWAY_TOKEN).",
            kind="settings")
    if token:
        h["Authorization"] = f"Bearer {token}"
    return h


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
) -> VariationsResult:
    """``POST /v1/images/variations`` with ``response_format=b64_json``; returns the PNGs."""
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
    body, ctype = build_multipart(fields, [("image", filename, "image/png", png)])
    headers = _auth_headers(token)
    headers["Content-Type"] = ctype
    if fresh:
        headers["Cache-Control"] = "no-cache"
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    raw, h = _call(req, url, timeout)
    rid = h.get("x-request-id")
    try:
        data = json.loads(raw.decode("utf-8"))
        items = data["data"]
        images = []
        for item in items:
            if item.get("b64_json"):
                images.append(base64.b64decode(item["b64_json"], validate=True))
            elif item.get("url"):
                images.append(_download(item["url"], url, token, timeout))
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


def _download(image_url: str, api_url: str, token: str, timeout: float) -> bytes:
    full = urllib.parse.urljoin(api_url, image_url)
    target, api = urllib.parse.urlsplit(full), urllib.parse.urlsplit(api_url)
    if target.scheme not in ("http", "https"):
        raise ValueError("an image url is not an http(s) address")
    # Image URLs are signed: the token goes only to the gateway itself, never to another
    # host a public_base_url (a CDN, say) points at.
    same_origin = (target.scheme, target.netloc) == (api.scheme, api.netloc)
    req = urllib.request.Request(full, headers=_auth_headers(token if same_origin else ""))
    raw, _ = _call(req, full, timeout)
    return raw


def get_usage(base_url: str, token: str, timeout: float = 10.0) -> dict[str, Any]:
    """``GET /v1/usage``: the user's limits and what is left."""
    url = api_base(base_url) + "/usage"
    req = urllib.request.Request(url, headers=_auth_headers(token), method="GET")
    raw, _ = _call(req, url, timeout)
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


def debug_dir() -> str | None:
    """``VARIATIONS_GATEWAY_DEBUG_DIR``: when set, the plug-in keeps its uploads there."""
    d = os.environ.get("VARIATIONS_GATEWAY_DEBUG_DIR", "").strip()
    return d or None
