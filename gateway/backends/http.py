"""What the HTTP backends share: a session, error mapping, the upstream's answers.

Every upstream failure leaves here as a :class:`BackendError` whose message names only
the backend (its config name) and what went wrong, and whose facts (``transient``,
``retry_after``, ``trips_breaker``) tell the router what to do next. The upstream's URL,
key and raw body never reach the client: bodies are parsed only to recognise a safety
rejection or a retired model, then dropped. Images are turned into stored PNGs by
``gateway.backends.normalise``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import json
import math
import re
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from gateway import __version__
from gateway.backends.base import (
    DEFAULT_TIMEOUTS,
    BackendError,
    BackendOptions,
    BackendState,
    Timeouts,
    bad_response,
    timeout_error,
)

MAX_RESPONSE_BYTES = 256 * 1024 * 1024
USER_AGENT = f"variations-gateway/{__version__}"
_CONTENT_POLICY_CODES = frozenset({"content_policy_violation", "moderation_blocked"})
T = TypeVar("T")


def check_base_url(url: str) -> str:
    if not re.match(r"^https?://[^/]+", url):
        raise ValueError("base_url must start with http:// or https://")
    return url.rstrip("/")


@dataclass(frozen=True)
class HttpOptions(BackendOptions):
    """Options every HTTP backend has: the upstream's ``base_url`` (checked here, so a
    subclass's own ``__post_init__`` calls this one first)."""

    base_url: str

    def __post_init__(self) -> None:
        check_base_url(self.base_url)


OptionsT = TypeVar("OptionsT", bound=HttpOptions)


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds an upstream asked us to wait: ``retry-after-ms`` first, then ``retry-after``
    (seconds or an HTTP date), as the OpenAI SDK reads them. ``None`` when absent/invalid.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    raw_ms = lower.get("retry-after-ms")
    if raw_ms is not None:
        try:
            value = float(raw_ms) / 1000.0
            if math.isfinite(value) and value >= 0:
                return value
        except ValueError:
            pass
    raw = lower.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
        return value if math.isfinite(value) and value >= 0 else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _error_fields(body: bytes) -> tuple[str, str]:
    """``(code, text)`` of an upstream error body, lower-cased; for classification only,
    never returned. Knows the OpenAI envelope ``{"error": {code, type, message}}`` (also
    Lemonade's), FastAPI's ``{"detail": ...}`` (Xinference, Forge) and A1111's
    ``{"error", "detail", "errors"}``; ``text`` joins every message-like field."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: deep nesting
        return "", ""
    if not isinstance(doc, dict):
        return "", ""
    err, texts, code = doc.get("error"), [], ""
    if isinstance(err, dict):
        code = str(err.get("code") or "")
        texts += [str(err.get(k) or "") for k in ("message", "type")]
    elif isinstance(err, str):
        texts.append(err)
    for key in ("detail", "errors", "message"):
        if isinstance(doc.get(key), str):
            texts.append(doc[key])
    return code.lower(), " ".join(texts).lower()


# A 5xx whose body says the failure is in the input or the configuration: the same call
# fails the same way again, so it is not retried against the same backend (the route may
# still fall back). WebUI: "Invalid encoded image" (A1111 api.py decode_base64_to_image);
# Lemonade: ``model_load_error``; Xinference: pipeline ValueErrors surface as 500 with the
# exception text in ``detail``.
_DETERMINISTIC_5XX = ("invalid encoded image", "model_load_error", "validation error",
                      "invalid input image", "cannot identify image file",
                      "invalid image", "not found in the model list", "model not found")
_MODEL_GONE = ("model_not_found", "model not found", "does not exist", "not found in the "
               "model list", "has been deprecated", "was retired", "has been retired")


def model_retired(name: str, model: str) -> BackendError:
    """The upstream says ``model`` does not exist (any more): no retry fixes that, but it
    is this backend's fault (a breaker failure) and the route's next backend may serve."""
    return BackendError(
        502, f"Backend {name!r} asked for model {model!r}, which its upstream says does not "
        "exist or was retired; the gateway admin must change the backend's model.",
        code="upstream_model_retired", kind="model_retired", should_retry=False)


def status_error(name: str, status: int, headers: Mapping[str, str], body: bytes,
                 model: str | None = None) -> BackendError:
    """Map an upstream HTTP error status to what the client and the router need.

    ``model``: the upstream model name the call asked for, so that an answer saying it
    does not exist becomes ``upstream_model_retired`` rather than a generic 4xx.
    """
    retry_after = parse_retry_after(headers)
    code, text = _error_fields(body)
    if status == 400 and (code in _CONTENT_POLICY_CODES or "safety system" in text):
        return BackendError(
            400, "Your request was rejected as a result of the upstream's safety system.",
            code="content_policy_violation", kind="content_policy", retryable=False,
            trips_breaker=False)
    if model and 400 <= status < 500 and status not in (401, 403, 408, 409, 429) and (
            code == "model_not_found"
            or (status == 404 and model.lower() in text)
            or (status == 404 and any(marker in text for marker in _MODEL_GONE))):
        return model_retired(name, model)
    if status in (401, 403):
        return BackendError(502, f"Backend {name!r} rejected the gateway's credentials; "
                            "the gateway admin must fix its upstream key.",
                            code="upstream_auth_error", kind="auth", should_retry=False)
    if status == 429:
        return BackendError(503, f"Backend {name!r} is rate limited.",
                            code="upstream_rate_limited", kind="http_429", transient=True,
                            retry_after=retry_after)
    if status == 503:
        return BackendError(503, f"Backend {name!r} is unavailable.",
                            code="upstream_unavailable", kind="http_503", transient=True,
                            retry_after=retry_after)
    if status >= 500:
        deterministic = code == "model_load_error" or any(
            marker in text for marker in _DETERMINISTIC_5XX)
        return BackendError(502, f"Backend {name!r} failed (HTTP {status}).",
                            code="upstream_error", kind="http_5xx",
                            transient=not deterministic)
    if status in (408, 409):
        return BackendError(502, f"Backend {name!r} failed (HTTP {status}).",
                            code="upstream_error", kind="http_4xx", transient=True)
    # Other 4xx: the gateway sent something this upstream refuses. Retrying the same
    # call cannot help; another backend in the route may.
    return BackendError(502, f"Backend {name!r} refused the request (HTTP {status}).",
                        code="upstream_rejected", kind="http_4xx", trips_breaker=False)


def strip_userinfo(url: str) -> str:
    """``url`` without ``user:password@`` (for identities and anything displayed)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


async def gather_all(*aws: Awaitable[T]) -> list[T]:
    """``asyncio.gather`` whose first failure cancels the rest: no upstream call keeps
    running (and costing) for a request that has already failed."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def batches(n: int, per_call: int) -> list[tuple[int, int]]:
    """``(offset, count)`` pairs splitting ``n`` images into calls of ``per_call``."""
    per_call = max(1, per_call)
    return [(i, min(per_call, n - i)) for i in range(0, n, per_call)]


def decode_b64(name: str, value: object) -> bytes:
    if not isinstance(value, str) or not value:
        raise bad_response(name, "missing base64 image")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise bad_response(name, "invalid base64") from None


# --------------------------------------------------------------------------- session


class HttpBackend(Generic[OptionsT]):
    """Base of the HTTP backends: options, session lifecycle, requests, error mapping.

    One constructor for all of them: the typed ``options`` (with the ``base_url``) and
    the :class:`Timeouts` that bound each exchange. A subclass adds its own state by
    extending ``__init__`` and speaks its upstream in ``generate``.
    """

    kind: ClassVar[str]
    options_class: ClassVar[type[BackendOptions]]

    def __init__(self, name: str, options: OptionsT,
                 timeouts: Timeouts = DEFAULT_TIMEOUTS) -> None:
        self.name = name
        self.options = options
        self.base_url = check_base_url(options.base_url)
        self._timeout = aiohttp.ClientTimeout(total=timeouts.total, connect=timeouts.connect,
                                              sock_connect=timeouts.connect)
        self._session: aiohttp.ClientSession | None = None

    def headers(self) -> dict[str, str]:
        """Per-request headers (auth included); never set on the session, so image
        downloads from other hosts do not carry the key."""
        return {"User-Agent": USER_AGENT, "Accept": "application/json"}

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, trust_env=False)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def check(self) -> BackendState:
        started = self._session is not None
        return BackendState(self.name, self.kind, started,
                            f"{self.kind} upstream" if started else "not started")

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise BackendError(503, f"Backend {self.name!r} is not started.",
                               code="upstream_unavailable", kind="not_started",
                               trips_breaker=False)
        return self._session

    async def request(self, method: str, path: str, *, url: str | None = None,
                      authed: bool = True, model: str | None = None, **kwargs: Any
                      ) -> tuple[bytes, str]:
        """One HTTP exchange: ``(body, content_type)`` of a 2xx, else a ``BackendError``.

        ``path`` is joined to ``base_url``; ``url`` (a URL the upstream handed out) is
        used as is and gets none of our credentials. ``model``: the upstream model the
        call names (see :func:`status_error`).
        """
        session = self._require_session()
        target = url if url is not None else self.base_url + path
        headers = self.headers() if authed else {"User-Agent": USER_AGENT}
        try:
            async with session.request(method, target, headers=headers,
                                       allow_redirects=False, **kwargs) as resp:
                body = await _read(resp, self.name)
                if resp.status >= 300:
                    raise status_error(self.name, resp.status, resp.headers, body, model)
                return body, resp.content_type
        except BackendError:
            raise
        except TimeoutError:  # aiohttp's connect and total timeouts are TimeoutErrors
            raise timeout_error(self.name) from None
        except aiohttp.ClientConnectorError:
            raise BackendError(502, f"Backend {self.name!r} cannot be reached.",
                               code="upstream_unavailable", kind="connect",
                               transient=True) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError,
                aiohttp.ClientOSError):
            raise BackendError(502, f"Backend {self.name!r} dropped the connection.",
                               code="upstream_error", kind="disconnected",
                               transient=True) from None
        except aiohttp.ClientError:
            raise BackendError(502, f"Backend {self.name!r} failed.", code="upstream_error",
                               kind="client_error", transient=True) from None

    async def answer(self, method: str, path: str) -> tuple[int, bytes]:
        """``(status, body)`` of any answer to ``method {base}{path}`` with our
        credentials, a 4xx or 5xx included (the caller reads it as news, not as a
        failure); only connection failures and timeouts raise :class:`BackendError`.
        Outside the router: no breaker, retry or limiter; the caller bounds its time."""
        session = self._require_session()
        try:
            async with session.request(method, self.base_url + path, headers=self.headers(),
                                       allow_redirects=False) as resp:
                return resp.status, await _read(resp, self.name)
        except TimeoutError:
            raise timeout_error(self.name) from None
        except aiohttp.ClientError:
            raise BackendError(502, f"Backend {self.name!r} cannot be reached.",
                               code="upstream_unavailable", kind="connect") from None

    async def request_json(self, method: str, path: str, **kwargs: Any) -> Any:
        body, _ = await self.request(method, path, **kwargs)
        try:
            return json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than Python's stack
            raise bad_response(self.name, "malformed JSON") from None

    async def download(self, url: str) -> bytes:
        """An image URL the upstream returned (signed URLs need no key)."""
        if not re.match(r"^https?://", url):
            # Xinference answers response_format=url with a path on its own disk.
            raise bad_response(self.name, "an image 'url' that is not an http(s) URL, "
                               "perhaps a path on the upstream's own disk")
        body, _ = await self.request("GET", "", url=url, authed=False)
        return body


async def _read(resp: aiohttp.ClientResponse, name: str) -> bytes:
    if resp.content_length is not None:
        if resp.content_length > MAX_RESPONSE_BYTES:
            raise bad_response(name, "response too large")
        # A known length is read in one piece (aiohttp stops at the length): no
        # chunk-by-chunk copy of a gpt-image answer's megabytes of base64.
        return await resp.read()
    buf = bytearray()
    async for chunk in resp.content.iter_chunked(1 << 16):
        buf += chunk
        if len(buf) > MAX_RESPONSE_BYTES:
            raise bad_response(name, "response too large")
    return bytes(buf)
