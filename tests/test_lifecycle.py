"""The upstream model's published lifecycle: gauges, /readyz, the warning log lines.

The OpenAI fakes serve ``GET /v1/models/{id}`` with a settable ``shutdown_date`` and
a set of retired models (404 ``model_not_found``), as OpenAI's API does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
import structlog
from fakes_upstreams import OpenAIEditsFake
from prometheus_client.parser import text_string_to_metric_families
from support import eventually
from upstream_cases import KEY, backend_entry, serve_fake

from gateway import backends as registry
from gateway.backends.openai.edits import OpenAIEditsBackend, OpenAIEditsOptions
from gateway.backends.sdwebui import SdWebUIBackend, SdWebUIOptions
from gateway.keys import METRICS
from gateway.lifecycle import LifecycleWatcher, ModelLifecycle, UnreadableRecord, parse_record
from gateway.metrics import Metrics

SHUTDOWN = "variations_gateway_backend_model_shutdown_timestamp_seconds"
AVAILABLE = "variations_gateway_backend_model_available"


def in_days(days: int) -> str:
    return (datetime.now(UTC).date() + timedelta(days=days)).isoformat()


def midnight(day: str) -> float:
    d = date.fromisoformat(day)
    return datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp()


def samples(text: str, name: str) -> dict[str, float]:
    """``backend`` label -> value of every sample of ``name`` in an exposition."""
    return {s.labels["backend"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name}


@pytest.fixture
async def fake() -> AsyncIterator[tuple[OpenAIEditsFake, str]]:
    upstream = OpenAIEditsFake(KEY)
    server, url = await serve_fake(upstream)
    yield upstream, url
    upstream.release()
    await server.close()


# ---- through the whole app ------------------------------------------------------------

async def test_announced_date_reaches_metrics_readyz_and_the_log(
        gateway_client: Any, fake: tuple[OpenAIEditsFake, str]) -> None:
    upstream, url = fake
    soon = in_days(20)
    upstream.shutdown_dates["gpt-image-2.5-flare"] = soon
    upstream.retired_models.add("gpt-image-1")
    backends = [backend_entry("openai_edits", url, name="soon", model="gpt-image-2.5-flare"),
                backend_entry("openai_edits", url, name="plain", model="gpt-image-2"),
                backend_entry("openai_edits", url, name="gone", model="gpt-image-1"),
                {"name": "local", "kind": "procedural", "executor": "thread"}]
    with structlog.testing.capture_logs() as logs:
        client = await gateway_client(backends=backends, route=["gone", "local"])

        async def exposition() -> str:
            async with client.get("/metrics") as r:
                assert r.status == 200
                return await r.text()

        text = ""

        async def scraped() -> bool:
            nonlocal text
            text = await exposition()
            return "soon" in samples(text, SHUTDOWN) and "gone" in samples(text, AVAILABLE)

        await eventually(scraped, "the lifecycle series after start")
    # Only the announced date has a series; the retired model is unavailable.
    assert samples(text, SHUTDOWN) == {"soon": midnight(soon)}
    assert samples(text, AVAILABLE) == {"soon": 1.0, "plain": 1.0, "gone": 0.0}
    assert KEY not in text and url not in text

    async with client.get("/readyz") as r:
        assert r.status == 200  # a retired first choice does not make the gateway unready
        checks = (await r.json())["checks"]["backends"]
    assert checks["soon"]["model_shutdown_date"] == soon
    assert checks["soon"]["model"] == "gpt-image-2.5-flare"
    assert "model_shutdown_date" not in checks["plain"]
    assert checks["gone"]["model_available"] is False
    assert checks["gone"]["breaker"] == "closed"  # the reading never counts as a failure
    assert "model" not in checks["local"]

    events = {(e["event"], e.get("backend")): e for e in logs}
    retiring = events[("backend_model_retiring", "soon")]
    assert retiring["log_level"] == "warning"
    assert (retiring["model"], retiring["shutdown_date"]) == ("gpt-image-2.5-flare", soon)
    assert retiring["days_left"] in (19, 20)
    assert events[("backend_model_retired", "gone")]["model"] == "gpt-image-1"
    assert not any(e.get("backend") == "plain" for e in logs if e["log_level"] == "warning")
    assert all(KEY not in str(e) and url not in str(e) for e in logs)
    # The reading carried the backend's own credentials to the models route.
    calls = [r for r in upstream.requests if r.path.startswith("/v1/models/")]
    assert {r.path for r in calls} == {"/v1/models/gpt-image-2.5-flare", "/v1/models/gpt-image-2",
                                       "/v1/models/gpt-image-1"}
    assert all(r.headers["Authorization"] == f"Bearer {KEY}" for r in calls)
    assert client.app[METRICS].registry.get_sample_value(
        "variations_gateway_backend_errors_total", {"backend": "gone", "kind": "http_4xx"}
    ) is None


# ---- the watcher on its own -----------------------------------------------------------

async def edits_backend(url: str, model: str) -> OpenAIEditsBackend:
    backend = OpenAIEditsBackend("b", OpenAIEditsOptions(base_url=url + "/v1", api_key=KEY,
                                                         model=model))
    await backend.start()
    return backend


async def test_rereads_every_interval_and_keeps_the_last_state_on_failure(
        fake: tuple[OpenAIEditsFake, str]) -> None:
    upstream, url = fake
    metrics = Metrics([])
    backend = await edits_backend(url, "gpt-image-2.6-sunburst")
    watcher = LifecycleWatcher([backend], lambda: metrics, interval=0.01)

    def value(name: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"backend": "b"})

    try:
        watcher.start()
        await eventually(lambda: value(AVAILABLE) == 1.0, "the first reading")
        assert value(SHUTDOWN) is None  # nothing announced: no series
        upstream.shutdown_dates["gpt-image-2.6-sunburst"] = "2026-12-01"
        await eventually(lambda: value(SHUTDOWN) == midnight("2026-12-01"), "the announcement")
        assert watcher.detail("b")["model_shutdown_date"] == "2026-12-01"

        # Failing readings: the fake's fault switch moved to the models route (500s).
        upstream.main_path = "/v1/models/gpt-image-2.6-sunburst"
        upstream.inject("500")
        before = len(upstream.requests)
        with structlog.testing.capture_logs() as logs:
            await eventually(lambda: len(upstream.requests) > before + 3, "failed readings")
        assert value(SHUTDOWN) == midnight("2026-12-01")  # kept
        assert ("backend_model_record_unavailable", "info", "HTTP 500") in {
            (e["event"], e["log_level"], e.get("reason")) for e in logs}
        upstream.inject(None)

        upstream.shutdown_dates.clear()  # the announcement withdrawn: the series goes
        await eventually(lambda: value(SHUTDOWN) is None, "the withdrawal")
        upstream.retired_models.add("gpt-image-2.6-sunburst")
        await eventually(lambda: value(AVAILABLE) == 0.0, "the retirement")
    finally:
        await watcher.close()
        await backend.close()


async def test_date_passed_logs_retired(fake: tuple[OpenAIEditsFake, str]) -> None:
    upstream, url = fake
    upstream.shutdown_dates["gpt-image-2.6-sunburst"] = "2026-12-01"
    backend = await edits_backend(url, "gpt-image-2.6-sunburst")
    watcher = LifecycleWatcher([backend], lambda: None,
                               clock=lambda: midnight("2026-12-03"))
    try:
        with structlog.testing.capture_logs() as logs:
            await watcher.refresh()
            await watcher.refresh()  # no change: no second line
    finally:
        await backend.close()
    assert [(e["event"], e["log_level"], e["shutdown_date"]) for e in logs] == [
        ("backend_model_retired", "warning", "2026-12-01")]


async def test_unreachable_upstream_is_logged_at_info_only() -> None:
    from support import free_port

    backend = await edits_backend(f"http://127.0.0.1:{free_port()}", "gpt-image-2")
    watcher = LifecycleWatcher([backend], lambda: None)
    try:
        with structlog.testing.capture_logs() as logs:
            await watcher.refresh()
    finally:
        await backend.close()
    assert [(e["event"], e["log_level"], e["reason"]) for e in logs] == [
        ("backend_model_record_unavailable", "info", "connect")]
    assert watcher.known("b") is None and watcher.detail("b") == {}


def test_only_http_backends_naming_a_model_are_watched() -> None:
    procedural = registry.create_backend("p", "procedural",
                                         registry.options_class("procedural")())
    sd = SdWebUIBackend("s", SdWebUIOptions(base_url="http://127.0.0.1:1"))
    watcher = LifecycleWatcher([procedural, sd], lambda: None)
    # Nothing to watch: no task. With one, start() would need a running loop (this test
    # has none) and raise RuntimeError.
    watcher.start()


# ---- parsing ------------------------------------------------------------------------

@pytest.mark.parametrize("status,body,expected", [
    (200, b'{"id": "m", "shutdown_date": "2026-12-01"}', ModelLifecycle("m", True,
                                                                      date(2026, 12, 1))),
    (200, b'{"id": "m", "shutdown_date": null}', ModelLifecycle("m", True, None)),
    (200, b'{"id": "m"}', ModelLifecycle("m", True, None)),
    (404, b'{"error": {"message": "gone", "code": "model_not_found"}}',
     ModelLifecycle("m", False, None)),
    (400, b'{"error": {"message": "gone", "code": "model_not_found"}}',
     ModelLifecycle("m", False, None)),
])
def test_parse_record(status: int, body: bytes, expected: ModelLifecycle) -> None:
    assert parse_record("m", status, body) == expected


@pytest.mark.parametrize("status,body", [
    (404, b"404: Not Found"),  # a server without the route is not a retired model
    (404, b'{"detail": "Model not found in the cluster"}'),
    (401, b'{"error": {"code": "invalid_api_key"}}'),
    (500, b'{"error": {"code": "model_not_found"}}'),
    (200, b"[]"),
    (200, b"not json"),
    (200, b'{"shutdown_date": "1 Dec 2026"}'),
    (200, b'{"shutdown_date": "2026-02-30"}'),
    (200, b'{"shutdown_date": 1764547200}'),
])
def test_parse_record_refuses(status: int, body: bytes) -> None:
    with pytest.raises(UnreadableRecord):
        parse_record("m", status, body)
