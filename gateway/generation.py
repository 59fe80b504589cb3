"""What crosses the backend seam: the source, the request, the result, and the clock.

These types sit on the ground floor because both sides of the seam speak them: the
upload checks (``png``) build a :class:`SourceImage`, the handler a
:class:`VariationRequest`, every backend returns a :class:`Generation`, and the config
prices a :class:`TokenUsage`. Keeping them here, beside nothing, lets ``backends/``
use ``png`` without ``png`` reaching back up into ``backends/``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class SourceImage:
    """The uploaded image after validation and normalisation.

    ``png`` is a clean RGBA PNG re-encoded by the gateway (palette, grey and 16-bit
    inputs already converted), ``pixels_sha256`` identifies the decoded pixels
    (RGBA bytes plus width and height), so two encodings of one layer share it.
    """

    png: bytes
    width: int
    height: int
    pixels_sha256: str
    upload_sha256: str


@dataclass(frozen=True)
class VariationRequest:
    """What a backend is asked to make."""

    image: SourceImage
    n: int
    size: int  # edge length in pixels: 256, 512 or 1024
    user: str | None  # the HMAC-hashed end-user id, safe to send upstream
    request_id: str
    seed: int  # base seed; backends derive one per image (seed + i)
    # The client's variation controls (issue 22); None: the backend's own default.
    strength: float | None = None  # 0..1, how far the variations stray
    prompt: str | None = None  # a hint, joined to the backend's own prompt
    seeded: bool = False  # the client chose ``seed`` (else it is the pool position's)


def with_hint(prompt: str, hint: str | None, separator: str = ", ") -> str:
    """A backend's configured ``prompt`` with the client's ``hint`` appended."""
    if not hint:
        return prompt
    return f"{prompt}{separator}{hint}" if prompt.strip() else hint


@dataclass(frozen=True)
class TokenUsage:
    """What an upstream that bills per token reported for one generation (gpt-image's
    ``usage``), summed over the calls that made it."""

    text_input_tokens: int = 0
    image_input_tokens: int = 0
    output_tokens: int = 0

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(self.text_input_tokens + other.text_input_tokens,
                          self.image_input_tokens + other.image_input_tokens,
                          self.output_tokens + other.output_tokens)


@dataclass(frozen=True)
class Generation:
    """What a backend's ``generate`` returns: the images, and the upstream's token usage
    where it reports one (the actual cost of the call, when token prices are set)."""

    images: list[bytes]
    usage: TokenUsage | None = None


class NormaliseClock:
    """Seconds spent turning upstream answers into stored PNGs under one
    :func:`normalise_clock` block.

    That conversion is the gateway's work, though it runs inside a backend's
    ``generate``: the router and the variations handler take this time out of backend
    time, so it lands in the request overhead (and its own histogram) instead of
    flattering the gateway.
    """

    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds = 0.0


_CLOCK: ContextVar[NormaliseClock | None] = ContextVar("normalise_clock", default=None)


@contextlib.contextmanager
def normalise_clock() -> Iterator[NormaliseClock]:
    """Count normalising time of the code (and the tasks it starts) in this block.

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


def add_normalise_time(seconds: float) -> None:
    """Charge ``seconds`` of normalising to the current :func:`normalise_clock`, if any
    (the backends' ``to_pngs`` calls this; outside a block the time is not counted)."""
    if (clock := _CLOCK.get()) is not None:
        clock.seconds += seconds
