"""Reading the ``/v1/images/variations`` multipart form, per the wire contract.

Every field arrives as a string; missing fields mean their defaults. Beyond OpenAI's
fields the gateway takes three optional variation controls (issue 22): ``strength``,
``seed`` and ``prompt`` (:data:`CONTROLS`); ``api.strict_contract`` refuses them as
unknown parameters, as OpenAI would. The body is read
with a hard cap, so an oversized upload is refused (400) before it is held in memory
whole: a declared length over the cap at once, any other as soon as it passes it. Then
it is parsed whole. The request's read deadline bounds slow clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import multipart
from aiohttp import web

from gateway.backends.base import CONTROL_NAMES, MAX_PROMPT_CHARS
from gateway.errors import ApiError, invalid
from gateway.png import MAX_UPLOAD_BYTES, NOT_PNG

SIZES = {"256x256": 256, "512x512": 512, "1024x1024": 1024}
RESPONSE_FORMATS = ("url", "b64_json")
CONTROLS = CONTROL_NAMES  # strength, seed, prompt: beyond OpenAI's contract
FIELDS = ("image", "model", "n", "response_format", "size", "user", *CONTROLS)
MAX_FIELD_BYTES = 1024
MAX_USER_CHARS = 256
MAX_SEED = 2**31 - 1
# A hint of MAX_PROMPT_CHARS characters may take up to 4 bytes each in UTF-8.
MAX_PROMPT_BYTES = 4 * MAX_PROMPT_CHARS
# The whole body: the image plus generous room for the text parts and boundaries.
MAX_BODY_BYTES = MAX_UPLOAD_BYTES + 64 * 1024
MAX_PARTS = len(FIELDS) + 1
DEFAULT_MODEL = "dall-e-2"


@dataclass(frozen=True)
class VariationForm:
    image: bytes
    model: str
    n: int
    response_format: str
    size: int
    size_label: str
    user: str | None
    # The variation controls; None: not sent (the backend's default).
    strength: float | None = None
    seed: int | None = None
    prompt: str | None = None

    def controls_used(self) -> list[str]:
        """The names of the controls this request sets."""
        return [name for name in CONTROLS if getattr(self, name) is not None]


class UploadBudget:
    """The bytes of request bodies being read into memory at once, across all clients.

    Per-member admission bounds what one member holds, but many members (or one with
    ``max_concurrent: null``) could still have hundreds of 4 MB bodies arriving at once;
    each is held whole (and briefly twice while its parts are joined). A request takes
    its declared length from the budget before its body is read (the upload cap when the
    length is unknown or the body is compressed) and gives it back once parsed. Past the
    budget it waits, first come first served, up to ``wait_seconds``, then is refused
    with 503 ``server_busy``: memory stays bounded and the client knows to retry.
    """

    def __init__(self, limit: int, wait_seconds: float) -> None:
        self.limit = limit
        self.wait_seconds = wait_seconds
        self.used = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    @staticmethod
    def bytes_for(request: web.Request) -> int:
        """What reading this request's body may hold: its declared length, else the cap
        (a gzip body inflates past its declared length; chunked bodies declare none)."""
        length = request.content_length
        if length is None or "Content-Encoding" in request.headers:
            return MAX_BODY_BYTES
        return min(length, MAX_BODY_BYTES)

    @contextlib.asynccontextmanager
    async def hold(self, wanted: int) -> AsyncIterator[None]:
        """Hold ``wanted`` bytes (at most the whole budget, so any body can be read
        alone) while the body is read; 503 ``server_busy`` if none come in time."""
        wanted = min(wanted, self.limit)
        if self._waiting or self.used + wanted > self.limit:
            waiter = asyncio.get_running_loop().create_future()
            entry = (wanted, waiter)
            self._waiting.append(entry)
            try:
                async with asyncio.timeout(self.wait_seconds):
                    await waiter
            except TimeoutError:
                self._forget(entry)
                raise ApiError(
                    503, "The gateway is reading as many uploads as it can hold right "
                    "now; retry in a moment.", code="server_busy", should_retry=True,
                    headers={"retry-after": "1"}) from None
            except BaseException:
                self._forget(entry)
                raise
        else:
            self.used += wanted
        try:
            yield
        finally:
            self.used -= wanted
            self._wake()

    def _forget(self, entry: tuple[int, asyncio.Future[None]]) -> None:
        """A waiter that gave up: if it had just been granted, give its bytes back."""
        wanted, waiter = entry
        if waiter.done() and not waiter.cancelled():
            self.used -= wanted
        else:
            waiter.cancel()
            with contextlib.suppress(ValueError):
                self._waiting.remove(entry)
        self._wake()

    def _wake(self) -> None:
        """Grant waiters in arrival order while they fit (no overtaking: a large body
        is not starved by a stream of small ones)."""
        while self._waiting:
            wanted, waiter = self._waiting[0]
            if waiter.done():
                self._waiting.popleft()
                continue
            if self.used + wanted > self.limit:
                return
            self._waiting.popleft()
            self.used += wanted
            waiter.set_result(None)


def _too_large() -> ApiError:
    # 400 as OpenAI answered it: the SDK raises BadRequestError (a 413 would be a bare
    # APIStatusError that code catching bad input misses).
    return ApiError(400, NOT_PNG, code="image_too_large", param="image")


def _malformed(detail: str) -> ApiError:
    return invalid(f"Malformed multipart body: {detail}.", None, "invalid_multipart")


def _field_too_long(name: str) -> ApiError:
    limit = {"user": MAX_USER_CHARS, "prompt": MAX_PROMPT_CHARS}.get(name, MAX_FIELD_BYTES)
    return invalid(f"Invalid '{name}': string too long. Expected a string with maximum "
                   f"length {limit}.", name, "string_above_max_length")


class _Parts:
    """The parts read so far, each cap applied part by part as the framing yields them."""

    def __init__(self) -> None:
        self._chunks: dict[str, list[bytes]] = {}
        self._sizes: dict[str, int] = {}
        self._current: str | None = None

    def start(self, name: str) -> None:
        if name not in FIELDS:
            raise invalid(f"Unknown parameter: '{_printable(name)}'.", name,
                          "unknown_parameter")
        if name in self._chunks:
            raise invalid(f"Duplicate parameter: '{name}' was sent more than once.", name,
                          "duplicate_parameter")
        self._current = name
        self._chunks[name], self._sizes[name] = [], 0

    def add(self, data: bytes) -> None:
        current = self._current
        if current is None:
            return
        self._sizes[current] += len(data)
        limit = {"image": MAX_UPLOAD_BYTES - 1, "prompt": MAX_PROMPT_BYTES}.get(
            current, MAX_FIELD_BYTES)
        if self._sizes[current] > limit:
            raise _too_large() if current == "image" else _field_too_long(current)
        self._chunks[current].append(data)

    def joined(self) -> dict[str, bytes]:
        return {name: b"".join(chunks) for name, chunks in self._chunks.items()}


@contextlib.contextmanager
def _framing_errors() -> Iterator[None]:
    """The parser's errors as ``invalid_multipart`` 400s."""
    try:
        yield
    except multipart.ParserLimitReached:
        raise _malformed("too many parts or headers") from None
    except multipart.ParserError as exc:
        # Some carry a (text, UnicodeDecodeError) pair: show the text, not the repr.
        detail = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
        raise _malformed(detail.rstrip(".")) from None


def _parser(boundary: str) -> multipart.PushMultipartParser:
    return multipart.PushMultipartParser(boundary, max_segment_count=MAX_PARTS, strict=True)


def _feed(parser: multipart.PushMultipartParser, chunk: bytes, parts: _Parts) -> None:
    for event in parser.parse(chunk):
        if isinstance(event, multipart.MultipartSegment):
            parts.start(event.name or "")
        elif event is not None:
            parts.add(event)


async def _read_body(request: web.Request) -> bytes:
    """The whole body, refused (400) as soon as it passes the cap while it arrives.

    Counted here, not from ``Content-Length``: aiohttp inflates a ``Content-Encoding:
    gzip`` body, so a few declared KB can be megabytes (``request.read()`` would only
    stop at ``client_max_size``, with a 413, and keep its copy for the request's life).
    """
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.content.iter_chunked(256 * 1024):
        received += len(chunk)
        if received > MAX_BODY_BYTES:
            raise _too_large()
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def split_parts(body: bytes, boundary: str) -> dict[str, bytes]:
    """The parts of a whole body, by name, as the :mod:`multipart` parser reads them
    (on one chunk, so its verdict does not depend on how the body arrived); its
    refusals, and every cap, as 400s."""
    parts = _Parts()
    parser = _parser(boundary)
    with _framing_errors():
        _feed(parser, body, parts)
        _feed(parser, b"", parts)
    return parts.joined()


def _text(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid(f"Invalid value for '{name}': expected UTF-8 text.", name) from None


# What OpenAI's form parser takes as an integer: ASCII digits (a sign for the range
# message). Python's int() also takes "1_0", Arabic-Indic and full-width digits.
_INTEGER = re.compile(r"[+-]?[0-9]+", re.ASCII)
_ASCII_SPACE = " \t\r\n"


def _parse_n(value: str) -> int:
    text = value.strip(_ASCII_SPACE)
    if not _INTEGER.fullmatch(text):
        raise invalid(
            "Invalid type for 'n': expected an integer, but got a string value that could "
            "not be converted into an integer.", "n", "invalid_type")
    n = int(text)
    if n < 1:
        raise invalid(
            "Invalid 'n': integer below minimum value. Expected a value >= 1, but got "
            f"{n} instead.", "n", "integer_below_min_value")
    if n > 10:
        raise invalid(
            "Invalid 'n': integer above maximum value. Expected a value <= 10, but got "
            f"{n} instead.", "n", "integer_above_max_value")
    return n


_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)", re.ASCII)


def _parse_strength(value: str) -> float:
    """A decimal 0..1 (no exponent, NaN or infinity), as OpenAI words its ranges."""
    text = value.strip(_ASCII_SPACE)
    if not _DECIMAL.fullmatch(text):
        raise invalid(
            "Invalid type for 'strength': expected a decimal, but got a string value that "
            "could not be converted into a decimal.", "strength", "invalid_type")
    strength = float(text)
    if strength < 0:
        raise invalid("Invalid 'strength': decimal below minimum value. Expected a value "
                      f">= 0, but got {_printable(text)} instead.", "strength",
                      "decimal_below_min_value")
    if strength > 1:
        raise invalid("Invalid 'strength': decimal above maximum value. Expected a value "
                      f"<= 1, but got {_printable(text)} instead.", "strength",
                      "decimal_above_max_value")
    return strength + 0.0  # -0.0 is 0.0


def _parse_seed(value: str) -> int:
    text = value.strip(_ASCII_SPACE)
    if not _INTEGER.fullmatch(text):
        raise invalid(
            "Invalid type for 'seed': expected an integer, but got a string value that "
            "could not be converted into an integer.", "seed", "invalid_type")
    seed = int(text)
    if seed < 0:
        raise invalid("Invalid 'seed': integer below minimum value. Expected a value >= 0, "
                      f"but got {seed} instead.", "seed", "integer_below_min_value")
    if seed > MAX_SEED:
        raise invalid("Invalid 'seed': integer above maximum value. Expected a value <= "
                      f"{MAX_SEED}, but got {_printable(text)} instead.", "seed",
                      "integer_above_max_value")
    return seed


def _parse_prompt(value: str) -> str | None:
    """The hint; blank means none (a form's empty hint line)."""
    if len(value) > MAX_PROMPT_CHARS:
        raise invalid(
            "Invalid 'prompt': string too long. Expected a string with maximum length "
            f"{MAX_PROMPT_CHARS}, but got a string with length {len(value)} instead.",
            "prompt", "string_above_max_length")
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in value):
        raise invalid("Invalid 'prompt': control characters are not allowed.", "prompt",
                      "invalid_value")
    return value.strip() or None


def _controls(values: dict[str, str], strict: bool) -> dict[str, Any]:
    """The variation controls sent, typed; with ``strict`` each is an unknown parameter."""
    sent = [name for name in CONTROLS if name in values]
    if strict and sent:
        raise invalid(f"Unknown parameter: '{sent[0]}'.", sent[0], "unknown_parameter")
    return {
        "strength": _parse_strength(values["strength"]) if "strength" in values else None,
        "seed": _parse_seed(values["seed"]) if "seed" in values else None,
        "prompt": _parse_prompt(values["prompt"]) if "prompt" in values else None,
    }


def _printable(value: str, limit: int = 40) -> str:
    shown = value[:limit].encode("unicode_escape").decode("ascii")
    return shown + ("..." if len(value) > limit else "")


async def read_fields(request: web.Request, read_timeout: float | None = None
                      ) -> tuple[bytes | None, dict[str, bytes]]:
    """Read the multipart body: the image part and the raw text parts, unvalidated.

    ``read_timeout`` bounds reading the whole body (408 past it); ``None``: no deadline.
    """
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise _too_large()
    ctype, options = multipart.parse_options_header(request.headers.get("Content-Type", ""))
    if ctype != "multipart/form-data":
        raise invalid(
            "Invalid Content-Type header ({}), expected multipart/form-data with an "
            "'image' file part.".format(_printable(ctype or "none")), None,
            "invalid_content_type")
    boundary = options.get("boundary", "")
    if not boundary or len(boundary) > 70:
        raise _malformed("the Content-Type header has no valid boundary")
    if request.content.is_eof():  # all here already (the usual case): no timer to set
        read_timeout = None
    try:
        async with asyncio.timeout(read_timeout):
            raw = split_parts(await _read_body(request), boundary)
    except TimeoutError:
        # A client trickling its body (slowloris) would otherwise hold a slot forever.
        raise ApiError(408, "Timed out reading the request body.", code="request_timeout"
                       ) from None
    return raw.pop("image", None), raw


def for_audit(raw: bytes | None) -> str | None:
    """A raw text part as the audit records it, before (and whether or not) it is valid."""
    if raw is None:
        return None
    return raw.decode("utf-8", "replace")[:MAX_USER_CHARS]


async def read_form(request: web.Request, models: frozenset[str],
                    read_timeout: float | None = None, *, strict: bool = False
                    ) -> VariationForm:
    """Read and validate the form; raise :class:`ApiError` with the right ``param``."""
    image, fields = await read_fields(request, read_timeout)
    return validate(image, fields, models, strict=strict)


def validate(image: bytes | None, fields: dict[str, bytes], models: frozenset[str], *,
             strict: bool = False) -> VariationForm:
    """Type and check every field per the contract (defaults for missing ones);
    ``strict`` refuses the variation controls as OpenAI would (unknown parameters)."""
    values = {name: _text(data, name) for name, data in fields.items()}

    if image is None:
        raise invalid("'image' is a required property", "image", "missing_required_parameter")

    model = values.get("model", DEFAULT_MODEL).strip() or DEFAULT_MODEL
    if model not in models:
        allowed = ", ".join(f"'{m}'" for m in sorted(models))
        raise invalid(f"Invalid value: '{_printable(model)}'. Supported values are: {allowed}.",
                      "model", "model_not_found")

    n = _parse_n(values["n"]) if "n" in values else 1

    size_label = values.get("size", "1024x1024").strip()
    if size_label not in SIZES:
        raise invalid(
            f"Invalid value: '{_printable(size_label)}'. Supported values are: '256x256', "
            "'512x512', and '1024x1024'.", "size", "invalid_value")

    response_format = values.get("response_format", "url").strip()
    if response_format not in RESPONSE_FORMATS:
        raise invalid(
            f"Invalid value: '{_printable(response_format)}'. Supported values are: 'url' "
            "and 'b64_json'.", "response_format", "invalid_value")

    user = values.get("user")
    if user is not None:
        if len(user) > MAX_USER_CHARS:
            raise invalid(
                "Invalid 'user': string too long. Expected a string with maximum length "
                f"{MAX_USER_CHARS}, but got a string with length {len(user)} instead.",
                "user", "string_above_max_length")
        if any(ord(c) < 32 or ord(c) == 127 for c in user):
            raise invalid("Invalid 'user': control characters are not allowed.", "user",
                          "invalid_value")
    return VariationForm(image, model, n, response_format, SIZES[size_label], size_label,
                         user, **_controls(values, strict))
