"""The seam between the gateway and its backends: what the router may rely on.

A backend turns one normalised source image into ``n`` PNG variations at a square
``size``. Everything else (auth, quota, cache, storage, URLs, metrics) is the gateway's
job, so a backend file only speaks its upstream's protocol. Backends that return URLs
download the bytes themselves: the gateway always stores PNG bytes.

The router sees a backend through :class:`Backend` alone, and a failure through
:class:`BackendError` alone: the error carries what the retry policy and the circuit
breaker need (``transient``, ``retry_after``, ``trips_breaker``), so no caller asks a
backend's own module what a failure meant. A backend's timeouts come with its
construction (:class:`Timeouts`), and backends whose upstream publishes model
lifecycles say so through :class:`PublishedModel`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from gateway.errors import ApiError
from gateway.generation import Generation, VariationRequest

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


@dataclass(frozen=True)
class Timeouts:
    """A backend's ``timeout_seconds`` and ``connect_timeout_seconds``, handed over at
    construction. ``total`` bounds one upstream exchange; the router separately bounds a
    whole call (attempts and waits) by the same figure."""

    total: float = 120.0
    connect: float = 10.0


# What an unset ``timeout_seconds``/``connect_timeout_seconds`` gives (frozen: safe to share).
DEFAULT_TIMEOUTS = Timeouts()


class BackendError(ApiError):
    """An upstream failure, already mapped to what the client should see, with the facts
    the router needs to decide what comes next.

    ``retryable``: the router may try the next backend in ``route``. ``transient``: the
    same backend may succeed on a retry (connection errors, 408, 409, 429, 5xx,
    timeouts). ``retry_after``: seconds the upstream asked for, if it did (a 429 or 503
    also answers it as a ``retry-after`` header). ``trips_breaker``: the failure says
    something about the backend's health, not about this one input or the gateway's own
    state. ``kind`` is a short label for metrics (``timeout``, ``connect``,
    ``http_5xx`` ...).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = "upstream_error",
        kind: str = "error",
        retryable: bool = True,
        transient: bool = False,
        retry_after: float | None = None,
        trips_breaker: bool = True,
        should_retry: bool | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if headers is None and retry_after is not None and status in (429, 503):
            headers = {"retry-after": str(max(1, math.ceil(retry_after)))}
        super().__init__(status, message, code=code, headers=dict(headers or {}),
                         should_retry=should_retry)
        self.kind = kind
        self.retryable = retryable
        self.transient = transient
        self.retry_after = retry_after
        self.trips_breaker = trips_breaker


def timeout_error(name: str) -> BackendError:
    """Backend ``name`` did not answer within its time."""
    return BackendError(504, f"Backend {name!r} did not answer in time.",
                        code="upstream_timeout", kind="timeout", transient=True)


def bad_response(name: str, what: str) -> BackendError:
    """The upstream answered 2xx with something unusable; ``what`` is our own words."""
    return BackendError(502, f"Backend {name!r} returned an unusable response ({what}).",
                        code="upstream_bad_response", kind="bad_response")


@dataclass
class BackendState:
    """What ``/readyz`` shows for one backend."""

    name: str
    kind: str
    ready: bool
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


CONTROL_NAMES = ("strength", "seed", "prompt")
MAX_PROMPT_CHARS = 1000


@dataclass(frozen=True)
class Controls:
    """The variation controls (issue 22) a backend honours beyond OpenAI's contract.

    ``strength``: its default strength (0..1) when it honours one, else None; ``seed``:
    the same seed gives the same images; ``prompt``: a hint joins its prompt. A request
    that sets a control its backend cannot honour is refused (400, ``param`` names it)
    rather than silently ignored.
    """

    strength: float | None = None
    seed: bool = False
    prompt: bool = False

    def honours(self, name: str) -> bool:
        return self.strength is not None if name == "strength" else bool(getattr(self, name))

    def __and__(self, other: Controls) -> Controls:
        """What a route of both honours: a control only if both do (a fallback must
        honour what the request set too); the first one's default strength."""
        return Controls(self.strength if other.strength is not None else None,
                        self.seed and other.seed, self.prompt and other.prompt)

    def described(self) -> dict[str, dict[str, object]]:
        """As ``GET /v1/models`` lists them: only the honoured ones."""
        out: dict[str, dict[str, object]] = {}
        if self.strength is not None:
            out["strength"] = {"default": self.strength}
        if self.seed:
            out["seed"] = {}
        if self.prompt:
            out["prompt"] = {"max_length": MAX_PROMPT_CHARS}
        return out


NO_CONTROLS = Controls()


class Backend(Protocol):
    """A variations backend. One instance per configured ``backends[]`` entry."""

    kind: ClassVar[str]
    options_class: ClassVar[type[BackendOptions]]

    name: str

    @property
    def controls(self) -> Controls:
        """The variation controls it honours (:class:`Controls`), and its default
        strength; ``generate`` maps ``request.strength``/``seed``/``prompt``."""
        ...

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


class BackendClass(Protocol):
    """What the registry builds a backend from: a class taking ``(name, options,
    timeouts)``, with its ``kind`` and typed ``options_class``."""

    kind: str
    options_class: type[BackendOptions]

    def __call__(self, name: str, options: Any, timeouts: Timeouts) -> Backend: ...


@runtime_checkable
class PublishedModel(Protocol):
    """A backend whose upstream publishes its model's lifecycle (``gateway.lifecycle``
    reads it). ``lifecycle_model`` is None where the upstream publishes none."""

    name: str

    @property
    def lifecycle_model(self) -> str | None: ...

    async def model_record(self, model: str) -> tuple[int, bytes]:
        """``(status, body)`` of the upstream's record of ``model``; connection failures
        raise :class:`BackendError`."""
        ...
