"""The one small interface every backend implements.

A backend turns one normalised source image into ``n`` PNG variations at a square
``size``. Everything else (auth, quota, cache, storage, URLs, metrics) is the gateway's
job, so a backend file only speaks its upstream's protocol. Backends that return URLs
download the bytes themselves: the gateway always stores PNG bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from gateway.errors import ApiError


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
    """What :meth:`Backend.generate` returns: the images, and the upstream's token usage
    where it reports one (the actual cost of the call, when token prices are set)."""

    images: list[bytes]
    usage: TokenUsage | None = None


SIZE_LABELS = ("256x256", "512x512", "1024x1024")


@dataclass(frozen=True)
class BackendOptions:
    """Base for a backend's typed options (the keys beside ``name`` and ``kind``).

    Pricing is per backend: :meth:`default_pricing` gives the table an admin's
    ``pricing`` entries override, and :meth:`price_key` picks the entry one image costs.
    Self-hosted backends cost no upstream money by default (set ``pricing`` to charge
    GPU time against budgets).
    """

    def default_pricing(self) -> dict[str, float]:
        """USD per image, by size label (or by another key :meth:`price_key` returns)."""
        return dict.fromkeys(SIZE_LABELS, 0.0)

    def price_key(self, size_label: str) -> str:
        """The ``pricing`` entry an image of ``size_label`` costs."""
        return size_label


class BackendError(ApiError):
    """An upstream failure, already mapped to what the client should see.

    ``retryable`` says whether the router may try the next backend in ``route``;
    ``kind`` is a short label for metrics (``timeout``, ``connect``, ``http_5xx`` ...).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = "upstream_error",
        kind: str = "error",
        retryable: bool = True,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status, message, code=code, headers=dict(headers or {}))
        self.kind = kind
        self.retryable = retryable


@dataclass
class BackendState:
    """What ``/readyz`` shows for one backend."""

    name: str
    kind: str
    ready: bool
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Backend(Protocol):
    """A variations backend. One instance per configured ``backends[]`` entry."""

    kind: ClassVar[str]
    options_class: ClassVar[type[BackendOptions]]

    name: str

    @property
    def identity(self) -> str:
        """A stable string that changes when the backend would produce other images.

        Part of the cache key: e.g. ``procedural:v1`` or ``sdwebui:<base_url>:<model>``.
        """
        ...

    async def start(self) -> None:
        """Open sessions, pools, executors. Called once on app startup."""
        ...

    async def close(self) -> None:
        """Release what ``start`` opened."""
        ...

    async def generate(self, request: VariationRequest) -> Generation:
        """Return exactly ``request.n`` PNG images of ``request.size`` squared pixels.

        Raises :class:`BackendError` for upstream failures.
        """
        ...

    async def check(self) -> BackendState:
        """Cheap readiness probe for ``/readyz``."""
        ...
