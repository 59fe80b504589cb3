"""Watching the published lifecycle of each backend's upstream model.

Upstream models die on a published schedule: OpenAI removed dall-e-2, gpt-image-1 and
the 1.x image models on announced dates, and ``GET {base}/models/{id}`` carries the
model's ``shutdown_date`` (``YYYY-MM-DD`` or null); a retired model answers 4xx with
code ``model_not_found`` (/work/shared/reference/backends.md). A backend pointed at a
retired model fails every request, so the date must reach the operator weeks before:
this watcher reads the record of every backend that names a ``lifecycle_model`` at start
and every 6 hours, and reports it as two gauges (alerted on by
``VariationsGatewayBackendModelRetiring`` and ``...Retired``), a warning log line and
the backend's ``/readyz`` detail.

The reading stays out of the request path: its own short timeout, no breaker, retry or
limiter, and readiness never depends on it. A failed reading (network, 5xx, a route the
upstream does not serve) is logged at info and keeps the last known state: a flaky
upstream must not make an announced date vanish from the dashboard.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime

import structlog

from gateway.backends.base import Backend, BackendError, PublishedModel
from gateway.metrics import Metrics

log = structlog.get_logger("gateway.lifecycle")

INTERVAL_SECONDS = 6 * 3600.0
TIMEOUT_SECONDS = 10.0
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


@dataclass(frozen=True)
class ModelLifecycle:
    """What the upstream last said of one backend's model.

    ``available`` is False once the upstream answers ``model_not_found``;
    ``shutdown_date`` is the announced date, None while none is announced.
    """

    model: str
    available: bool
    shutdown_date: date | None

    @property
    def shutdown_timestamp(self) -> float | None:
        """The shutdown date's midnight UTC as Unix time (the gauge's value)."""
        if self.shutdown_date is None:
            return None
        return datetime(self.shutdown_date.year, self.shutdown_date.month,
                        self.shutdown_date.day, tzinfo=UTC).timestamp()


class UnreadableRecord(Exception):
    """The upstream answered, but not with a model record we can read."""


def parse_record(model: str, status: int, body: bytes) -> ModelLifecycle:
    """The lifecycle in one ``GET /models/{model}`` answer, or :class:`UnreadableRecord`.

    Only a 4xx whose error ``code`` is ``model_not_found`` means retired: a bare 404 is
    as likely a server without this route (Xinference, Lemonade builds) as a dead model.
    """
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        payload = None
    if 400 <= status < 500:
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict) and error.get("code") == "model_not_found":
            return ModelLifecycle(model, False, None)
        raise UnreadableRecord(f"HTTP {status}")
    if not 200 <= status < 300:
        raise UnreadableRecord(f"HTTP {status}")
    if not isinstance(payload, dict):
        raise UnreadableRecord("not a JSON object")
    raw = payload.get("shutdown_date")
    if raw is None:
        return ModelLifecycle(model, True, None)
    if not isinstance(raw, str) or not _DATE.fullmatch(raw):
        raise UnreadableRecord("shutdown_date is not YYYY-MM-DD")
    try:
        return ModelLifecycle(model, True, date.fromisoformat(raw))
    except ValueError:
        raise UnreadableRecord("shutdown_date is not a date") from None


class LifecycleWatcher:
    """Reads each watched backend's model record at :meth:`start` and every ``interval``.

    ``metrics`` is a callable returning the app's :class:`Metrics` (or None); ``clock``
    (Unix seconds) only decides whether a log line says retiring or retired.
    """

    def __init__(self, backends: Iterable[Backend], metrics: Callable[[], Metrics | None],
                 *, interval: float = INTERVAL_SECONDS, timeout: float = TIMEOUT_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        self._watched: list[PublishedModel] = [
            b for b in backends
            if isinstance(b, PublishedModel) and b.lifecycle_model is not None]
        self._metrics = metrics
        self._interval = interval
        self._timeout = timeout
        self._clock = clock
        self._known: dict[str, ModelLifecycle] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin reading in the background: start-up never waits for an upstream."""
        if self._watched and self._task is None:
            self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def known(self, backend: str) -> ModelLifecycle | None:
        return self._known.get(backend)

    def detail(self, backend: str) -> dict[str, object]:
        """The backend's ``/readyz`` extras: the announced date, or that the model is gone."""
        state = self._known.get(backend)
        if state is None:
            return {}
        extra: dict[str, object] = {"model": state.model}
        if state.shutdown_date is not None:
            extra["model_shutdown_date"] = state.shutdown_date.isoformat()
        if not state.available:
            extra["model_available"] = False
        return extra

    async def _run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._interval)

    async def refresh(self) -> None:
        """One reading of every watched backend, concurrently."""
        await asyncio.gather(*(self._refresh_one(b) for b in self._watched))

    async def _refresh_one(self, backend: PublishedModel) -> None:
        model = backend.lifecycle_model
        assert model is not None
        try:
            async with asyncio.timeout(self._timeout):
                status, body = await backend.model_record(model)
            state = parse_record(model, status, body)
        except TimeoutError:
            log.info("backend_model_record_unavailable", backend=backend.name, model=model,
                     reason="timeout")
            return
        except (BackendError, UnreadableRecord) as exc:
            # The message names only the backend (never the URL, key or body).
            log.info("backend_model_record_unavailable", backend=backend.name, model=model,
                     reason=getattr(exc, "kind", None) or str(exc))
            return
        except Exception:  # a bug here must not end the readings for good
            log.exception("backend_model_record_failed", backend=backend.name, model=model)
            return
        previous = self._known.get(backend.name)
        self._known[backend.name] = state
        if (m := self._metrics()) is not None:
            m.set_model_lifecycle(backend.name, state.available, state.shutdown_timestamp)
        if state != previous:
            self._announce(backend.name, state)

    def _announce(self, backend: str, state: ModelLifecycle) -> None:
        """A warning on the first reading and on each change that tells of an end."""
        if not state.available:
            log.warning("backend_model_retired", backend=backend, model=state.model,
                        reason="model_not_found")
            return
        if state.shutdown_date is None:
            return
        ts = state.shutdown_timestamp
        assert ts is not None
        days = (ts - self._clock()) / 86400
        event = "backend_model_retired" if days <= 0 else "backend_model_retiring"
        log.warning(event, backend=backend, model=state.model,
                    shutdown_date=state.shutdown_date.isoformat(), days_left=max(0, int(days)))
