"""Choosing backends for a request and trying them in ``route`` order, resiliently.

``model=dall-e-2`` (the contract's only value) means "the route": the backends in
``route`` order, later ones as fallbacks. A backend's own name as ``model`` pins that
backend. Each backend call goes through, in order: its circuit breaker (an open circuit
is skipped without a call), its concurrency limiter (bounded queue wait), then attempts
under one deadline of ``timeout_seconds`` with the retry policy between them. A failure
the backend marks ``retryable`` moves on to the next backend; others (bad input, a
safety rejection) are answered as they are. An exception a backend did not map is its
upstream's unusable answer: a 502 like any other bad response, never a 500. The result
says which backend produced the images and how long it took, so metrics can separate
backend time from gateway overhead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from gateway import backends as registry
from gateway.backends.base import (
    Backend,
    BackendError,
    BackendState,
    Controls,
    PublishedModel,
    Timeouts,
    bad_response,
    timeout_error,
)
from gateway.config import BackendConfig, Config
from gateway.generation import (
    Generation,
    NormaliseClock,
    TokenUsage,
    VariationRequest,
    normalise_clock,
)
from gateway.lifecycle import LifecycleWatcher
from gateway.metrics import Metrics
from gateway.resilience import CircuitBreaker, ConcurrencyLimiter, RetryPolicy
from gateway.upload import DEFAULT_MODEL

log = structlog.get_logger("gateway.router")


@dataclass(frozen=True)
class Generated:
    images: list[bytes]
    backend: str
    seconds: float
    usage: TokenUsage | None = None


@dataclass
class Guard:
    """The resilience state of one backend."""

    config: BackendConfig
    policy: RetryPolicy
    breaker: CircuitBreaker
    limiter: ConcurrencyLimiter


class Router:
    """Owns the backend instances, their guards and the route.

    ``metrics`` is a callable returning the app's :class:`Metrics` (``build_app`` makes
    them after the router), or the instance itself, or ``None`` in unit tests.
    """

    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self._backends: dict[str, Backend] = {}
        self._guards: dict[str, Guard] = {}
        for b in config.backends:
            backend = registry.create_backend(
                b.name, b.kind, b.options, Timeouts(b.timeout_seconds, b.connect_timeout_seconds))
            self._backends[b.name] = backend
            self._guards[b.name] = Guard(
                b, RetryPolicy(b.retry),
                CircuitBreaker(b.breaker, on_change=self._breaker_reporter(b.name)),
                ConcurrencyLimiter(b.name, b.max_concurrent, b.queue_timeout_seconds))
        self._route = tuple(config.route)
        self._order = [b.name for b in config.backends]
        self._metrics = metrics
        self.lifecycle = LifecycleWatcher(self._backends.values(), lambda: self.metrics)

    @property
    def metrics(self) -> Metrics | None:
        return self._metrics

    def _breaker_reporter(self, name: str) -> Callable[[str], None]:
        def report(state: str) -> None:
            log.warning("breaker_state", backend=name, state=state)
            if (m := self.metrics) is not None:
                m.set_breaker(name, state)
        return report

    @property
    def models(self) -> frozenset[str]:
        return frozenset({DEFAULT_MODEL, *self._backends})

    @property
    def backends(self) -> dict[str, Backend]:
        return dict(self._backends)

    def guard(self, name: str) -> Guard:
        return self._guards[name]

    def chain(self, model: str) -> Sequence[Backend]:
        if model == DEFAULT_MODEL:
            return [self._backends[name] for name in self._route]
        return [self._backends[model]]

    def identity(self, model: str) -> str:
        """Cache identity of what ``model`` runs: its chain's first backend. Images a
        fallback makes are served but never pooled under it (see ``cache.Fresh``)."""
        return self.chain(model)[0].identity

    def controls(self, model: str) -> Controls:
        """The variation controls ``model`` honours: those every backend of its chain
        honours (a fallback must honour what the request set too), with the first
        backend's default strength."""
        chain = self.chain(model)
        honoured = chain[0].controls
        for backend in chain[1:]:
            honoured = honoured & backend.controls
        return honoured

    def is_first(self, model: str, backend: str) -> bool:
        """Whether ``backend`` is ``model``'s first choice (not a fallback)."""
        return self.chain(model)[0].name == backend

    def report_breakers(self) -> None:
        """Re-report every breaker's current state to the metrics.

        Transitions are reported as they happen, except open -> half_open: that one is
        only the clock passing the cool-down, noticed by the next ``allow()``. Without
        traffic ``backend_circuit_state`` would say ``open`` all night while /readyz
        says ``half_open``; the app's periodic gauge refresh calls this to keep it true.
        """
        if (m := self.metrics) is not None:
            for name, guard in self._guards.items():
                m.set_breaker(name, guard.breaker.state)

    async def start(self) -> None:
        self.report_breakers()
        for b in self._backends.values():
            await b.start()
        self.lifecycle.start()

    async def close(self) -> None:
        await self.lifecycle.close()
        for b in self._backends.values():
            await b.close()

    async def check(self) -> list[BackendState]:
        states = []
        for b in self._backends.values():
            state = await b.check()
            guard = self._guards[b.name]
            state.extra.update({
                "breaker": guard.breaker.state,
                "consecutive_failures": guard.breaker.failures,
                "retry_in_seconds": round(guard.breaker.retry_in(), 1),
                "in_flight": guard.limiter.in_flight,
                "queued": guard.limiter.waiting,
                **self.lifecycle.detail(b.name),
            })
            states.append(state)
        return states

    async def generate(self, model: str, request: VariationRequest) -> Generated:
        """Run the chain; fall through to the next backend on a retryable failure."""
        last: BackendError | None = None
        for backend in self.chain(model):
            guard = self._guards[backend.name]
            if not guard.breaker.allow():
                self._error(backend.name, "circuit_open")
                log.warning("backend_skipped", backend=backend.name, reason="circuit_open",
                            request_id=request.request_id)
                last = BackendError(
                    503, f"Backend {backend.name!r} is failing and paused; try again later.",
                    code="upstream_unavailable", kind="circuit_open", transient=False,
                    retry_after=max(1.0, guard.breaker.retry_in()), trips_breaker=False)
                continue
            started = time.perf_counter()
            normalising = NormaliseClock()
            try:
                with normalise_clock() as normalising:
                    generation = await self._call(backend, guard, request)
            except BackendError as exc:
                self._observe(backend.name, started, normalising.seconds)
                if exc.trips_breaker:
                    guard.breaker.failure()
                else:
                    guard.breaker.release()
                log.warning("backend_failed", backend=backend.name, kind=exc.kind,
                            status=exc.status, code=exc.code, request_id=request.request_id)
                if exc.code == "upstream_model_retired":
                    self._model_retired(backend)
                last = exc
                if not exc.retryable:
                    raise
                continue
            except BaseException:  # cancelled (client left): no verdict on the upstream
                guard.breaker.release()
                raise
            seconds = self._observe(backend.name, started, normalising.seconds)
            guard.breaker.success()
            return Generated(generation.images, backend.name, seconds, generation.usage)
        assert last is not None
        raise last

    async def _call(self, backend: Backend, guard: Guard, request: VariationRequest
                    ) -> Generation:
        """Attempts under one deadline, holding one concurrency slot throughout."""
        async with guard.limiter.slot():
            loop = asyncio.get_running_loop()
            deadline = loop.time() + guard.config.timeout_seconds
            attempt = 0
            while True:
                attempt += 1
                try:
                    async with asyncio.timeout_at(deadline):
                        generation = await backend.generate(request)
                except TimeoutError:
                    self._error(backend.name, "timeout")
                    raise timeout_error(backend.name) from None
                except BackendError as exc:
                    self._error(backend.name, exc.kind)
                    if not exc.transient:
                        raise
                    delay = guard.policy.delay(attempt, exc.retry_after)
                    if delay is None or loop.time() + delay >= deadline:
                        raise
                    if (m := self.metrics) is not None:
                        m.backend_retries.labels(backend.name).inc()
                    log.info("backend_retry", backend=backend.name, kind=exc.kind,
                             attempt=attempt, delay_s=round(delay, 3),
                             request_id=request.request_id)
                    await asyncio.sleep(delay)
                    continue
                except Exception:
                    # Backends map every failure they foresee to a BackendError; anything
                    # else escaping is an upstream answer no parser expected (a stray byte,
                    # JSON nested past the stack). That is the upstream's failure: a 502
                    # that counts against its breaker and lets the route's next backend
                    # try, not a 500 the client retries, paying the upstream each time.
                    log.exception("backend_unexpected_error", backend=backend.name,
                                  request_id=request.request_id)
                    self._error(backend.name, "unexpected")
                    raise bad_response(backend.name, "unexpected answer") from None
                if len(generation.images) != request.n:
                    self._error(backend.name, "bad_response")
                    raise bad_response(backend.name, f"{len(generation.images)} images "
                                       f"instead of {request.n}")
                return generation

    def _model_retired(self, backend: Backend) -> None:
        """Say which config line to change: a retired model fails every request."""
        index = self._order.index(backend.name)
        model = backend.lifecycle_model if isinstance(backend, PublishedModel) else None
        log.error("upstream_model_retired", backend=backend.name, model=model,
                  fix=f"set backends[{index}].model (backend {backend.name!r}) to a model "
                      "the upstream serves today, or take the backend out of route")

    def _error(self, name: str, kind: str) -> None:
        if (m := self.metrics) is not None:
            m.backend_errors.labels(name, kind).inc()

    def _observe(self, name: str, started: float, normalising: float) -> float:
        """Backend time of one call: its wall time less the gateway's own conversion of
        the answers (``normalising``, observed on its own histogram)."""
        seconds = max(0.0, time.perf_counter() - started - normalising)
        if (m := self.metrics) is not None:
            m.backend_seconds.labels(name).observe(seconds)
            if normalising:
                m.normalise_seconds.labels(name).observe(normalising)
        return seconds
