"""Failures of Generate Variations' gateway calls, as sentences a user can act on.

Every failure becomes one :class:`GatewayError` whose text says what went wrong and what to
do, built from the gateway's OpenAI error envelope ``{"error": {"message", "type", "param",
"code"}}`` and its headers (:func:`error_sentence`), or from what broke below HTTP
(:func:`transport_error`). No sentence quotes what a server sent back unasked, so nothing
echoed (the member's token) ends up in a dialog; what it does quote (the envelope's
message and param, the request id, a redirect's target) goes through :func:`shown`:
printable characters only, at most 200 of them. Standard library only.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import urllib.error
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import Message
from typing import Any

CA_FILE_ENV = "VARIATIONS_GATEWAY_CA_FILE"
SETTINGS_HINT = "Filters > Generate Variations Settings"

SHOWN_MAX = 200


def shown(text: Any) -> str:
    """What a server sent, fit for a sentence in a GIMP dialog: printable characters only
    (no control, bidi-override or line-break characters that could disguise the dialog),
    cut at :data:`SHOWN_MAX` characters (an answer may be a megabyte long)."""
    clean = "".join(ch for ch in str(text) if ch.isprintable()).strip()
    return clean if len(clean) <= SHOWN_MAX else clean[:SHOWN_MAX] + "..."


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


def lower_headers(msg: Message | Mapping[str, str] | None) -> dict[str, str]:
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


@dataclass(frozen=True)
class _Answer:
    """An HTTP error answer of the gateway, as the sentence builders below read it."""

    status: int
    url: str
    headers: dict[str, str]
    envelope: dict[str, Any] | None

    @property
    def message(self) -> str:
        return shown(self.envelope.get("message") or "") if self.envelope else ""

    @property
    def code(self) -> Any:
        return self.envelope.get("code") if self.envelope else None

    @property
    def param(self) -> str:
        return shown(self.envelope.get("param") or "") if self.envelope else ""

    @property
    def rid(self) -> str | None:
        return self.headers.get("x-request-id") or None

    @property
    def ref(self) -> str:
        return f" (request id {self.rid})" if self.rid else ""

    def retry_in(self) -> str | None:
        retry = self.headers.get("retry-after")
        return _seconds_text(retry) if retry else None

    def make(self, sentence: str, kind: str) -> GatewayError:
        return GatewayError(sentence, status=self.status, code=self.code, kind=kind,
                            request_id=self.rid)


def error_sentence(
    status: int,
    body: bytes,
    headers: Mapping[str, str] | Message | None,
    url: str,
) -> GatewayError:
    """Turn an HTTP error answer of the gateway into a :class:`GatewayError`. The first
    rule that fits wins: no envelope, then what the gateway refused, then what failed."""
    # Headers are quoted too (retry-after, x-ratelimit-*, x-request-id): all cleaned.
    clean = {k: shown(v) for k, v in lower_headers(headers).items()}
    a = _Answer(status, url, clean, _envelope(body))
    if a.envelope is None:
        return _without_envelope(a)
    return _refused(a) or _failed(a)


def _without_envelope(a: _Answer) -> GatewayError:
    """No OpenAI error envelope: a wrong URL, or something (a proxy?) in between."""
    if a.status == 404:
        return a.make(
            f"There is no variations gateway at {a.url} (HTTP 404): check the gateway URL "
            f"in {SETTINGS_HINT}.", "not_found")
    reason = {502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}.get(
        a.status, "")
    return a.make(
        f"The gateway at {a.url} answered HTTP {a.status} {reason}".rstrip()
        + " without an error message; something between GIMP and the gateway (a proxy?) "
        f"may be failing, or the URL is wrong. Check {SETTINGS_HINT}.",
        "backend" if a.status >= 500 else "http")


def _refused(a: _Answer) -> GatewayError | None:
    """What the gateway refused (401, 403, 429, a bad request, 404), or None."""
    if a.status == 401:
        if a.code == "invalid_api_key":
            return a.make(
                f"The gateway rejected your token: it is wrong or was revoked. Enter the "
                f"token your gateway admin gave you in {SETTINGS_HINT}.", "auth")
        return a.make(
            f"The gateway needs a token and none was sent. Enter your token in {SETTINGS_HINT} "
            "(or set VARIATIONS_GATEWAY_TOKEN).", "auth")
    if a.status == 403:
        if a.code == "user_blocked":
            return a.make(
                "Your gateway account is blocked, so no images can be made. Ask the gateway "
                f"admin to unblock you.{a.ref}", "blocked")
        return a.make(f"The gateway refused this request: {a.message}{a.ref}", "forbidden")
    if a.status == 429:
        return _rate_limited(a)
    if a.status == 400 or a.status == 413 or a.status == 422:
        what = f" (parameter '{a.param}')" if a.param else ""
        return a.make(f"The gateway refused the request{what}: {a.message}", "bad_request")
    if a.status == 404:
        return a.make(
            f"There is no variations endpoint at {a.url} (HTTP 404: {a.message}). Check the "
            f"gateway URL in {SETTINGS_HINT}.", "not_found")
    return None


def _rate_limited(a: _Answer) -> GatewayError:
    """429: the image quota is used up (with what is left and when it resets), or too many
    requests right now."""
    h = a.headers
    retry = h.get("retry-after")
    if a.code == "quota_exceeded":
        limit = h.get("x-ratelimit-limit-images")
        remaining = h.get("x-ratelimit-remaining-images")
        reset = h.get("x-ratelimit-reset-images")
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
        return a.make(sentence, "quota")
    wait = f" Wait {_seconds_text(retry)} and try again." if retry else " Wait a moment " \
        "and try again."
    return a.make(f"Too many requests to the gateway right now ({a.message.rstrip('.')})."
                  f"{wait}", "rate")


def _failed(a: _Answer) -> GatewayError:
    """What failed on the gateway's side or behind it (timeouts, storage, state, the
    image backend), else the status as it came."""
    if a.status == 504 or a.code == "upstream_timeout":
        return a.make(
            "The image backend behind the gateway took too long and the gateway gave up. Try "
            f"again, or ask for fewer or smaller variations.{a.ref}", "timeout")
    if a.code == "storage_unavailable":
        return a.make(
            "The gateway cannot store images right now: its disk is full or its storage is "
            f"failing. Nothing was charged. Tell the gateway admin.{a.ref}", "server")
    if a.code == "state_unavailable":
        retry = a.retry_in()
        later = f"Try again in {retry}" if retry else "Try again shortly"
        return a.make(
            "The gateway cannot reach its shared state store (Redis), so it cannot check "
            f"quotas and makes no images for now. Nothing was charged. {later}; if it keeps "
            f"happening, tell the gateway admin.{a.ref}", "state")
    if a.status in (502, 503) or a.code in ("upstream_error", "upstream_unavailable"):
        retry = a.retry_in()
        later = f" Try again in {retry}." if retry else " Try again later."
        detail = f" ({a.message.rstrip('.')})" if a.message else ""
        return a.make(
            f"The gateway's image backend is down or failing{detail}.{later}{a.ref}", "backend")
    if a.status >= 500:
        return a.make(f"The gateway failed (HTTP {a.status}): {a.message}{a.ref}", "server")
    return a.make(f"The gateway refused the request (HTTP {a.status}): {a.message}{a.ref}",
                  "http")


def not_a_gateway(url: str) -> GatewayError:
    return GatewayError(
        f"The server at {url} did not answer like a variations gateway (is the URL right?). "
        f"Check the gateway URL in {SETTINGS_HINT}.", kind="protocol")


def transport_error(exc: BaseException, url: str, timeout: float) -> GatewayError:
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
        return not_a_gateway(url)
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



def too_large(url: str, cap: int) -> GatewayError:
    return GatewayError(
        f"The answer of the server at {url} is larger than {cap / 1048576:g} MB, far more "
        f"than a variations gateway sends; GIMP stopped reading it. Check the gateway URL in "
        f"{SETTINGS_HINT}.", kind="protocol")


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
    return shown(target)


def redirected(e: urllib.error.HTTPError, url: str) -> GatewayError:
    target = _redirect_target(e, url)
    return GatewayError(
        f"The gateway URL answered with a redirect (HTTP {e.code}) from {url} to {target}. "
        "GIMP does not follow redirects, so your token is never sent to another address: if "
        f"the gateway now lives there, enter that URL in {SETTINGS_HINT} (ask the gateway "
        "admin if unsure).", status=e.code, kind="redirect")


