"""Choosing backends for a request and trying them in ``route`` order.

``model=dall-e-2`` (the contract's only value) means "the route": the backends in
``route`` order, later ones as fallbacks. A backend's own name as ``model`` pins that
backend. The result says which backend produced the images and how long it took, so
metrics can separate backend time from gateway overhead.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from gateway import backends as registry
from gateway.backends.base import Backend, BackendError, BackendState, VariationRequest
from gateway.config import Config
from gateway.upload import DEFAULT_MODEL

log = structlog.get_logger("gateway.router")


@dataclass(frozen=True)
class Generated:
    images: list[bytes]
    backend: str
    seconds: float


class Router:
    """Owns the backend instances and the route."""

    def __init__(self, config: Config) -> None:
        self._backends: dict[str, Backend] = {
            b.name: registry.create_backend(b.name, b.kind, b.options) for b in config.backends
        }
        self._route = tuple(config.route)

    @property
    def models(self) -> frozenset[str]:
        return frozenset({DEFAULT_MODEL, *self._backends})

    @property
    def backends(self) -> dict[str, Backend]:
        return dict(self._backends)

    def chain(self, model: str) -> Sequence[Backend]:
        if model == DEFAULT_MODEL:
            return [self._backends[name] for name in self._route]
        return [self._backends[model]]

    def identity(self, model: str) -> str:
        """Cache identity of what ``model`` would run: every backend in its chain."""
        return "|".join(b.identity for b in self.chain(model))

    async def start(self) -> None:
        for b in self._backends.values():
            await b.start()

    async def close(self) -> None:
        for b in self._backends.values():
            await b.close()

    async def check(self) -> list[BackendState]:
        return [await b.check() for b in self._backends.values()]

    async def generate(self, model: str, request: VariationRequest) -> Generated:
        """Run the chain; fall through to the next backend on a retryable failure."""
        chain = self.chain(model)
        last: BackendError | None = None
        for backend in chain:
            started = time.perf_counter()
            try:
                images = await backend.generate(request)
            except BackendError as exc:
                log.warning("backend_failed", backend=backend.name, kind=exc.kind,
                            status=exc.status, request_id=request.request_id)
                last = exc
                if not exc.retryable:
                    raise
                continue
            return Generated(images, backend.name, time.perf_counter() - started)
        assert last is not None
        raise last
