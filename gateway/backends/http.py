"""What the HTTP backends share: a session, error mapping, image checks.

Every upstream failure leaves here as an :class:`UpstreamError` whose message names
only the backend (its config name) and what went wrong. The upstream's URL, key and raw
body never reach the client: bodies are parsed only to recognise a safety rejection,
then dropped. Every returned image is checked to decode in full and leaves as a PNG of
the requested size, so what the gateway stores does not depend on the backend and a
broken image is the upstream's failure, never cached.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import math
import re
import struct
import time
import zlib
from collections.abc import Awaitable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any, ClassVar, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
from PIL import Image, ImageChops, UnidentifiedImageError

from gateway import __version__, png
from gateway.backends.base import BackendError, BackendOptions, BackendState
from gateway.resilience import parse_retry_after

# Formats the upstreams we speak to document for their outputs.
IMAGE_FORMATS = frozenset({"PNG", "JPEG", "WEBP"})
MAX_RESPONSE_BYTES = 256 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000
USER_AGENT = f"variations-gateway/{__version__}"
_CONTENT_POLICY_CODES = frozenset({"content_policy_violation", "moderation_blocked"})
T = TypeVar("T")


class UpstreamError(BackendError):
    """A :class:`BackendError` with what the retry policy and the breaker need.

    ``transient``: the same backend may succeed on a retry (connection errors, 408, 409,
    429, 5xx, timeouts). ``retry_after``: seconds the upstream asked for, if it did.
    ``trips_breaker``: the failure says something about the upstream's health (not
    about this one input).
    """

    def __init__(self, status: int, message: str, *, code: str, kind: str,
                 transient: bool = False, retryable: bool = True,
                 retry_after: float | None = None, trips_breaker: bool = True,
                 should_retry: bool | None = None) -> None:
        headers = {"retry-after": str(max(1, math.ceil(retry_after)))} \
            if retry_after is not None and status in (429, 503) else {}
        super().__init__(status, message, code=code, kind=kind, retryable=retryable,
                         headers=headers)
        self.transient = transient
        self.retry_after = retry_after
        self.trips_breaker = trips_breaker
        if should_retry is not None:
            self.should_retry = should_retry


def timeout_error(name: str) -> UpstreamError:
    return UpstreamError(504, f"Backend {name!r} did not answer in time.",
                         code="upstream_timeout", kind="timeout", transient=True)


def bad_response(name: str, what: str) -> UpstreamError:
    """The upstream answered 2xx with something unusable; ``what`` is our own words."""
    return UpstreamError(502, f"Backend {name!r} returned an unusable response ({what}).",
                         code="upstream_bad_response", kind="bad_response")


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


def model_retired(name: str, model: str) -> UpstreamError:
    """The upstream says ``model`` does not exist (any more): no retry fixes that, but it
    is this backend's fault (a breaker failure) and the route's next backend may serve."""
    return UpstreamError(
        502, f"Backend {name!r} asked for model {model!r}, which its upstream says does not "
        "exist or was retired; the gateway admin must change the backend's model.",
        code="upstream_model_retired", kind="model_retired", should_retry=False)


def status_error(name: str, status: int, headers: Mapping[str, str], body: bytes,
                 model: str | None = None) -> UpstreamError:
    """Map an upstream HTTP error status to what the client and the router need.

    ``model``: the upstream model name the call asked for, so that an answer saying it
    does not exist becomes ``upstream_model_retired`` rather than a generic 4xx.
    """
    retry_after = parse_retry_after(headers)
    code, text = _error_fields(body)
    if status == 400 and (code in _CONTENT_POLICY_CODES or "safety system" in text):
        return UpstreamError(
            400, "Your request was rejected as a result of the upstream's safety system.",
            code="content_policy_violation", kind="content_policy", retryable=False,
            trips_breaker=False)
    if model and 400 <= status < 500 and status not in (401, 403, 408, 409, 429) and (
            code == "model_not_found"
            or (status == 404 and model.lower() in text)
            or (status == 404 and any(marker in text for marker in _MODEL_GONE))):
        return model_retired(name, model)
    if status in (401, 403):
        return UpstreamError(502, f"Backend {name!r} rejected the gateway's credentials; "
                             "the gateway admin must fix its upstream key.",
                             code="upstream_auth_error", kind="auth", should_retry=False)
    if status == 429:
        return UpstreamError(503, f"Backend {name!r} is rate limited.",
                             code="upstream_rate_limited", kind="http_429", transient=True,
                             retry_after=retry_after)
    if status == 503:
        return UpstreamError(503, f"Backend {name!r} is unavailable.",
                             code="upstream_unavailable", kind="http_503", transient=True,
                             retry_after=retry_after)
    if status >= 500:
        deterministic = code == "model_load_error" or any(
            marker in text for marker in _DETERMINISTIC_5XX)
        return UpstreamError(502, f"Backend {name!r} failed (HTTP {status}).",
                             code="upstream_error", kind="http_5xx",
                             transient=not deterministic)
    if status in (408, 409):
        return UpstreamError(502, f"Backend {name!r} failed (HTTP {status}).",
                             code="upstream_error", kind="http_4xx", transient=True)
    # Other 4xx: the gateway sent something this upstream refuses. Retrying the same
    # call cannot help; another backend in the route may.
    return UpstreamError(502, f"Backend {name!r} refused the request (HTTP {status}).",
                         code="upstream_rejected", kind="http_4xx", trips_breaker=False)


def strip_userinfo(url: str) -> str:
    """``url`` without ``user:password@`` (for identities and anything displayed)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def check_base_url(url: str) -> str:
    if not re.match(r"^https?://[^/]+", url):
        raise ValueError("base_url must start with http:// or https://")
    return url.rstrip("/")


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


# --------------------------------------------------------------------------- images


def decode_b64(name: str, value: object) -> bytes:
    if not isinstance(value, str) or not value:
        raise bad_response(name, "missing base64 image")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise bad_response(name, "invalid base64") from None


def to_png(name: str, data: bytes, size: int) -> bytes:
    """Decode an upstream image, fit it to ``size`` squared, re-encode it as PNG.

    Re-encoding also drops metadata (SD WebUI writes its prompt into a PNG text chunk).
    A plain PNG already of the right size only loses its metadata chunks, once its pixel
    data is known to inflate in full; anything else is decoded by Pillow. Either way an
    image that does not decode is the upstream's failure, never stored.

    This runs once per generated image and is the gateway's own CPU time, so each step
    is the cheapest that keeps the picture (``tests/perf/bench_normalise.py`` measures
    them; ``tests/backends/test_normalise.py`` holds the result to the plain Lanczos
    fit): a JPEG is decoded at the smallest DCT scale that still covers ``size``
    (draft mode, 1/2 to 1/8 of the work), often exactly ``size``; other resizing
    reduces by a whole factor first and resamples the rest with Lanczos; the PNG is
    written by :func:`encode_png`.
    """
    try:
        plain = png.plain_png_of_size(data, size)
    except ValueError:
        raise bad_response(name, "PNG with broken pixel data") from None
    if plain is not None:
        return plain
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in IMAGE_FORMATS:
                raise bad_response(name, f"{img.format or 'unknown'} is not PNG/JPEG/WebP")
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise bad_response(name, "image too large")
            if img.format == "JPEG":
                # Scales so that the shorter side stays >= size; JPEGs have no alpha.
                img.draft("RGB", (size, size))
            img.load()
            mode = "RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB"
            out = img.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError,
            Image.DecompressionBombError):
        raise bad_response(name, "not a decodable image") from None
    if out.size != (size, size):
        out = _fit(out, size)
    return encode_png(out)


def _fit(img: Image.Image, size: int) -> Image.Image:
    """``ImageOps.fit`` (centred crop to a square, Lanczos) with ``reducing_gap=2``:
    a whole-factor box reduction first while at least twice ``size`` remains, then
    Lanczos. Pillow documents the result as close to a plain Lanczos; the quality test
    holds it to that."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return img.resize((size, size), Image.Resampling.LANCZOS,
                      box=(left, top, left + side, top + side), reducing_gap=2.0)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR_TYPES = {"RGB": 2, "RGBA": 6}


def _chunk(tag: bytes, body: bytes) -> bytes:
    return (struct.pack(">I", len(body)) + tag + body
            + struct.pack(">I", zlib.crc32(body, zlib.crc32(tag))))


def encode_png(img: Image.Image) -> bytes:
    """An RGB or RGBA image as a PNG, about four times faster than Pillow's encoder.

    Pillow tries all five PNG filters on every row and keeps the best; on a 512 px
    picture that choice costs more than the compression. Here every row uses the "Up"
    filter (difference to the row above, computed in one C call by
    ``ImageChops.subtract_modulo``) and deflate runs at level 1 without LZ77 string
    matching (Huffman only, or run-length for flat pictures): filtered photo detail
    gains little from matching, which is where deflate spends its time. On gpt-image-
    like pictures the file is smaller than Pillow's ``compress_level=1``; the pixels are
    exactly the same (PNG is lossless).
    """
    w, h = img.size
    above = Image.new(img.mode, img.size)  # the first row's "above" is zeros
    above.paste(img.crop((0, 0, w, h - 1)), (0, 1))
    raw = ImageChops.subtract_modulo(img, above).tobytes()
    stride = w * len(img.getbands())
    up = b"\x02"
    rows = b"".join([up + raw[i:i + stride] for i in range(0, len(raw), stride)])
    # Flat pictures (illustrations, backgrounds) filter to runs of zeros: run-length
    # matching shrinks them ~10x and is fast. Photos and noise leave few zeros: there
    # Huffman coding alone is as small and ~1.5 ms faster per 512 px. A 1/61 sample
    # of the filtered bytes decides.
    sample = raw[::61]
    flat = sample.count(0) * 2 >= len(sample)
    z = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE if flat else zlib.Z_HUFFMAN_ONLY)
    idat = z.compress(rows) + z.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, _PNG_COLOUR_TYPES[img.mode], 0, 0, 0)
    return (_PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


class NormaliseClock:
    """Seconds spent in :func:`to_pngs` under one :func:`normalise_clock` block.

    Turning upstream answers into stored PNGs is the gateway's work, though it runs
    inside a backend's ``generate``: the router and the variations handler take this
    time out of backend time, so it lands in the request overhead (and its own
    histogram) instead of flattering the gateway.
    """

    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds = 0.0


_CLOCK: ContextVar[NormaliseClock | None] = ContextVar("normalise_clock", default=None)


@contextlib.contextmanager
def normalise_clock() -> Iterator[NormaliseClock]:
    """Count :func:`to_pngs` time of the code (and the tasks it starts) in this block.

    Blocks nest: an inner block's time is also added to the outer ones, so the router
    (per backend attempt) and the handler (per request) each see theirs.
    """
    outer = _CLOCK.get()
    clock = NormaliseClock()
    token = _CLOCK.set(clock)
    try:
        yield clock
    finally:
        _CLOCK.reset(token)
        if outer is not None:
            outer.seconds += clock.seconds


async def to_pngs(name: str, images: list[bytes], size: int) -> list[bytes]:
    """:func:`to_png` for each image, off the event loop; the wall time (executor queue
    included) goes to the current :func:`normalise_clock`."""
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    try:
        return list(await asyncio.gather(
            *(loop.run_in_executor(None, to_png, name, data, size) for data in images)))
    finally:
        if (clock := _CLOCK.get()) is not None:
            clock.seconds += time.perf_counter() - started


# --------------------------------------------------------------------------- session


class HttpBackend:
    """Base of the HTTP backends: session lifecycle, requests, error mapping.

    The router calls :meth:`configure_timeouts` with the backend's ``timeout_seconds``
    and ``connect_timeout_seconds`` before :meth:`start`.
    """

    kind: ClassVar[str]
    options_class: ClassVar[type[BackendOptions]]

    def __init__(self, name: str, base_url: str) -> None:
        self.name = name
        self.base_url = check_base_url(base_url)
        self._timeout = aiohttp.ClientTimeout(total=120.0, connect=10.0, sock_connect=10.0)
        self._session: aiohttp.ClientSession | None = None

    def configure_timeouts(self, total: float, connect: float) -> None:
        self._timeout = aiohttp.ClientTimeout(total=total, connect=connect,
                                              sock_connect=connect)

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
            raise UpstreamError(503, f"Backend {self.name!r} is not started.",
                                code="upstream_unavailable", kind="not_started",
                                trips_breaker=False)
        return self._session

    async def request(self, method: str, path: str, *, url: str | None = None,
                      authed: bool = True, model: str | None = None, **kwargs: Any
                      ) -> tuple[bytes, str]:
        """One HTTP exchange: ``(body, content_type)`` of a 2xx, else ``UpstreamError``.

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
        except UpstreamError:
            raise
        except TimeoutError:  # aiohttp's connect and total timeouts are TimeoutErrors
            raise timeout_error(self.name) from None
        except aiohttp.ClientConnectorError:
            raise UpstreamError(502, f"Backend {self.name!r} cannot be reached.",
                                code="upstream_unavailable", kind="connect",
                                transient=True) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError,
                aiohttp.ClientOSError):
            raise UpstreamError(502, f"Backend {self.name!r} dropped the connection.",
                                code="upstream_error", kind="disconnected",
                                transient=True) from None
        except aiohttp.ClientError:
            raise UpstreamError(502, f"Backend {self.name!r} failed.", code="upstream_error",
                                kind="client_error", transient=True) from None

    @property
    def lifecycle_model(self) -> str | None:
        """The model whose published lifecycle ``gateway.lifecycle`` watches; None for
        upstreams that publish none (the OpenAI backends name their ``model``)."""
        return None

    async def model_record(self, model: str) -> tuple[int, bytes]:
        """``GET {base}/models/{model}`` with our credentials: ``(status, body)`` of any
        answer (a 4xx ``model_not_found`` is news, not a failure); connection failures
        raise :class:`UpstreamError`. Outside the router: no breaker, retry or limiter;
        the caller bounds its time."""
        session = self._require_session()
        try:
            async with session.get(f"{self.base_url}/models/{quote(model, safe='')}",
                                   headers=self.headers(), allow_redirects=False) as resp:
                return resp.status, await _read(resp, self.name)
        except TimeoutError:
            raise timeout_error(self.name) from None
        except aiohttp.ClientError:
            raise UpstreamError(502, f"Backend {self.name!r} cannot be reached.",
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


def data_items(name: str, payload: Any, n: int) -> list[dict[str, Any]]:
    """The first ``n`` items of an OpenAI images response's ``data``."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise bad_response(name, "no data array")
    if len(data) < n:
        raise bad_response(name, f"{len(data)} images instead of {n}")
    return data[:n]


async def openai_images(backend: HttpBackend, items: list[dict[str, Any]]) -> list[bytes]:
    """Image bytes of OpenAI ``data`` items: ``b64_json`` decoded, ``url`` downloaded."""
    async def one(item: dict[str, Any]) -> bytes:
        if item.get("b64_json"):
            return decode_b64(backend.name, item["b64_json"])
        if isinstance(item.get("url"), str):
            return await backend.download(item["url"])
        raise bad_response(backend.name, "item has neither b64_json nor url")
    return await gather_all(*(one(i) for i in items))
