"""``/metrics``: the families and labels, bounded cardinality, no secrets, port and token.

In-process gateways (``gateway_client``) drive real requests through the app; the
exposition is parsed with prometheus-client's own parser. The separate metrics port
needs the CLI's server, so that test runs a real gateway process.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from support import ADMIN_TOKEN, ROOT, TOKENS, auth, eventually, png_bytes, sha

from gateway import quota
from gateway.app import refresh_gauges
from gateway.keys import QUOTA
from gateway.metrics import GUARD_LIMIT, OTHER, LabelGuard, Metrics

P = "variations_gateway_"
# The contract: every family, its type and its label names (docs/metrics.md lists them).
FAMILIES: dict[str, tuple[str, frozenset[str]]] = {
    P + "requests": ("counter", frozenset({"route", "status_class", "error_code"})),
    P + "request_duration_seconds": ("histogram", frozenset({"route"})),
    P + "request_overhead_seconds": ("histogram", frozenset({"route"})),
    P + "requests_in_flight": ("gauge", frozenset()),
    P + "upload_bytes": ("histogram", frozenset()),
    P + "images_generated": ("counter", frozenset({"backend", "size"})),
    P + "images_served_from_cache": ("counter", frozenset({"size"})),
    P + "cache_lookups": ("counter", frozenset({"result"})),
    P + "cache_saved_usd": ("counter", frozenset()),
    P + "variation_controls": ("counter", frozenset({"control"})),
    P + "cache_entries": ("gauge", frozenset()),
    P + "cache_bytes": ("gauge", frozenset()),
    P + "quota_rejections": ("counter", frozenset({"limit", "user"})),
    P + "user_requests": ("counter", frozenset({"user"})),
    P + "user_images": ("counter", frozenset({"user"})),
    P + "user_spend_usd": ("counter", frozenset({"user"})),
    P + "user_budget_used_ratio": ("gauge", frozenset({"user"})),
    P + "backend_request_duration_seconds": ("histogram", frozenset({"backend"})),
    P + "backend_normalise_seconds": ("histogram", frozenset({"backend"})),
    P + "backend_errors": ("counter", frozenset({"backend", "kind"})),
    P + "backend_retries": ("counter", frozenset({"backend"})),
    P + "backend_circuit_state": ("gauge", frozenset({"backend", "state"})),
    P + "backend_up": ("gauge", frozenset({"backend"})),
    P + "backend_model_shutdown_timestamp_seconds": ("gauge", frozenset({"backend"})),
    P + "backend_model_available": ("gauge", frozenset({"backend"})),
    P + "audit_events": ("counter", frozenset()),
    P + "audit_write_errors": ("counter", frozenset()),
    P + "audit_outbox_records": ("gauge", frozenset()),
    P + "audit_outbox_oldest_age_seconds": ("gauge", frozenset()),
    P + "abuse_suspected": ("counter", frozenset({"reason", "user"})),
    P + "storage_free_ratio": ("gauge", frozenset({"store"})),
    P + "config_reloads": ("counter", frozenset({"result"})),
}
USER_VALUES = frozenset({"alice", "bob", "anonymous", "_unknown"})
Series = frozenset[tuple[str, tuple[tuple[str, str], ...]]]


def series(text: str) -> Series:
    """Every sample's (name, labels) in an exposition."""
    return frozenset((s.name, tuple(sorted(s.labels.items())))
                     for f in text_string_to_metric_families(text) for s in f.samples)


def families(text: str) -> dict[str, tuple[str, set[str]]]:
    out: dict[str, tuple[str, set[str]]] = {}
    for f in text_string_to_metric_families(text):
        labels: set[str] = set()
        for s in f.samples:
            labels |= set(s.labels) - {"le"}
        out[f.name] = (f.type, labels)
    return out


def form(user: str | None = None, size: str = "256x256", n: int = 1,
         model: str | None = None, seed: int = 1) -> aiohttp.FormData:
    data = aiohttp.FormData()
    data.add_field("image", png_bytes(32, seed=seed), filename="a.png",
                   content_type="image/png")
    data.add_field("n", str(n))
    data.add_field("size", size)
    if user is not None:
        data.add_field("user", user)
    if model is not None:
        data.add_field("model", model)
    return data


async def scrape(client, headers: dict[str, str] | None = None) -> str:  # type: ignore[no-untyped-def]
    r = await client.get("/metrics", headers=headers or {})
    assert r.status == 200, await r.text()
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return await r.text()


async def post(client, headers: dict[str, str], **kw: object) -> int:  # type: ignore[no-untyped-def]
    r = await client.post("/v1/images/variations", data=form(**kw), headers=headers)  # type: ignore[arg-type]
    await r.read()
    return r.status


async def test_families_types_and_labels(gateway_client) -> None:  # type: ignore[no-untyped-def]
    client = await gateway_client(
        users={"alice": {"token_sha256": sha(TOKENS["alice"])},
               "bob": {"token_sha256": sha(TOKENS["bob"]),
                       "quota": {"images_per_day": 1}}},
        # Priced, so spend is counted (self-hosted backends cost nothing by default).
        backends=[{"name": "local", "kind": "procedural", "executor": "thread",
                   "pricing": {"256x256": 0.016, "512x512": 0.018, "1024x1024": 0.02}}])
    assert await post(client, auth()) == 200                        # miss, generated
    assert await post(client, auth()) == 200                        # hit
    assert await post(client, auth(), n=2) == 200                   # partial
    assert await post(client, {**auth(), "Cache-Control": "no-store"}) == 200  # bypass
    assert await post(client, auth("bob"), seed=5) == 200
    assert await post(client, auth("bob"), seed=6) == 429           # images_per_day
    assert await post(client, {"Authorization": "Bearer nope"}) == 401
    assert (await client.get("/no/such/route")).status == 404
    text = await scrape(client)

    found = families(text)
    for name, (kind, labels) in FAMILIES.items():
        assert name in found, f"{name} missing"
        assert found[name][0] == kind, name
        # A labelled family with no children yet shows no samples, so no label names.
        assert found[name][1] in (labels, set()), (name, found[name][1])
    assert set(found) <= set(FAMILIES), set(found) - set(FAMILIES)

    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in text_string_to_metric_families(text) for s in f.samples}

    def value(name: str, **labels: str) -> float:
        return values[(P + name, tuple(sorted(labels.items())))]

    for result in ("hit", "partial", "miss", "bypass"):
        assert value("cache_lookups_total", result=result) >= 1, result
    assert value("quota_rejections_total", limit="images_per_day", user="bob") == 1
    assert value("requests_total", route="/v1/images/variations", status_class="4xx",
                 error_code="invalid_api_key") == 1
    assert value("requests_total", route="unmatched", status_class="4xx",
                 error_code="not_found") == 1
    assert value("user_budget_used_ratio", user="bob") == 1.0
    assert value("images_generated_total", backend="local", size="256x256") == 4
    assert value("user_images_total", user="alice") == 3
    assert value("user_spend_usd_total", user="alice") > 0
    assert value("upload_bytes_count") == 6
    assert value("audit_events_total") == 7
    # The router reports each backend's breaker at start: one-hot, closed, up.
    states = {dict(k[1])["state"]: v for k, v in values.items()
              if k[0] == P + "backend_circuit_state"}
    assert states == {"closed": 1.0, "half_open": 0.0, "open": 0.0}
    assert value("backend_up", backend="local") == 1.0
    assert value("backend_request_duration_seconds_count", backend="local") == 4


def sample(text: str, name: str, **labels: str) -> float:
    (value,) = [s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == P + name and s.labels == labels]
    return value


async def test_budget_share_drops_at_the_new_day_without_a_request(
        gateway_client, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A member who used their whole day and then went quiet must not keep the budget
    alert firing through the next day: the gauge is refreshed from the quota store."""
    client = await gateway_client(
        users={"alice": {"token_sha256": sha(TOKENS["alice"]),
                         "quota": {"images_per_day": 2, "images_per_month": None}},
               "bob": {"token_sha256": sha(TOKENS["bob"])}})
    assert await post(client, auth(), n=2) == 200
    assert sample(await scrape(client), "user_budget_used_ratio", user="alice") == 1.0
    tomorrow = time.time() + 86400
    monkeypatch.setattr(quota, "time", SimpleNamespace(time=lambda: tomorrow))
    monkeypatch.setattr(client.app[QUOTA], "clock", lambda: tomorrow)
    await refresh_gauges(client.app)
    text = await scrape(client)
    assert sample(text, "user_budget_used_ratio", user="alice") == 0.0
    assert sample(text, "user_budget_used_ratio", user="bob") == 0.0  # a series for each


async def test_an_open_circuit_whose_cooldown_ended_stops_reading_down(
        gateway_client) -> None:  # type: ignore[no-untyped-def]
    """No request comes after an outage (night): the refresh still reports half-open, so
    BackendDown does not fire until morning."""
    from gateway.keys import LIVE

    client = await gateway_client()
    router = client.app[LIVE].current.router
    name = next(iter(router.backends))
    breaker = router.guard(name).breaker
    now = [1000.0]
    breaker.clock = lambda: now[0]
    for _ in range(breaker.config.failure_threshold):
        breaker.failure()
    assert sample(await scrape(client), "backend_up", backend=name) == 0.0
    now[0] += breaker.config.cooldown_seconds + 1
    await refresh_gauges(client.app)
    text = await scrape(client)
    assert sample(text, "backend_up", backend=name) == 1.0
    assert sample(text, "backend_circuit_state", backend=name, state="half_open") == 1.0


async def test_cardinality_1000_users_and_1000_bad_tokens_add_no_series(
        gateway_client) -> None:  # type: ignore[no-untyped-def]
    """1,000 distinct ``user`` values and 1,000 unknown tokens: the same series set."""
    client = await gateway_client(abuse={"distinct_end_users": 3})
    # Warm-up: one request of each kind the flood sends (a miss, then hits; bad tokens),
    # and one scrape so /metrics itself is counted before the snapshot.
    assert await post(client, auth(), user="warm-1") == 200
    assert await post(client, auth(), user="warm-2") == 200
    assert await post(client, {"Authorization": "Bearer warm-bad"}) == 401
    assert (await client.get("/v1/usage", headers={"Authorization": "Bearer warm"})).status \
        == 401
    await scrape(client)
    before = series(await scrape(client))

    users = [f"end-user-{i:04d}@studio.example" for i in range(1000)]
    bad = [f"vg-bad-token-{i:04d}-{hashlib.sha256(str(i).encode()).hexdigest()[:16]}"
           for i in range(1000)]

    async def batch(items: Iterable[str], call) -> None:  # type: ignore[no-untyped-def]
        items = list(items)
        for start in range(0, len(items), 50):
            codes = await asyncio.gather(*(call(x) for x in items[start:start + 50]))
            assert set(codes) == {codes[0]}, codes

    await batch(users, lambda u: post(client, auth(), user=u))
    await batch(bad, lambda t: post(client, {"Authorization": f"Bearer {t}"}))
    await batch(bad[:100], lambda t: _status(client.get(
        "/v1/usage", headers={"Authorization": f"Bearer {t}"})))
    text = await scrape(client)
    after = series(text)
    assert after == before, sorted(after ^ before)[:10]
    for leaked in (*users, *bad, *(sha(t) for t in bad)):
        assert leaked not in text
    # The traffic was counted, in the same series.
    assert f'{P}cache_lookups_total{{result="hit"}} 1001.0' in text
    assert (f'{P}requests_total{{error_code="invalid_api_key",route="/v1/images/variations",'
            f'status_class="4xx"}} 1001.0') in text
    assert f'{P}abuse_suspected_total{{reason="many_end_users",user="alice"}} 1.0' in text


async def _status(call) -> int:  # type: ignore[no-untyped-def]
    async with call as r:
        await r.read()
        return r.status


async def test_exposition_has_no_token_key_or_raw_user_value(gateway_client) -> None:  # type: ignore[no-untyped-def]
    metrics_token = "vg-metrics-scrape-token-3f9a"
    signing_key = "k" * 64
    client = await gateway_client(metrics={"token_sha256": sha(metrics_token)},
                                  images={"signing_key": signing_key})
    secret_user = "mallory.secret.user@example.org"
    bad_token = "sk-live-ThisIsNotAMemberToken0123456789"
    assert await post(client, auth(), user=secret_user) == 200
    assert await post(client, auth("bob"), user=secret_user, seed=2) == 200
    assert await post(client, {"Authorization": f"Bearer {bad_token}"}, user=secret_user) \
        == 401
    await _status(client.get("/admin/usage", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}))
    assert await _status(client.post(f"/admin/users/{secret_user}/block", headers={
        "Authorization": f"Bearer {ADMIN_TOKEN}"})) == 404
    text = await scrape(client, {"Authorization": f"Bearer {metrics_token}"})

    secrets = [*TOKENS.values(), ADMIN_TOKEN, metrics_token, bad_token, secret_user,
               signing_key, *(sha(t) for t in (*TOKENS.values(), ADMIN_TOKEN, metrics_token,
                                               bad_token)), "vgu-", "Bearer"]
    for s in secrets:
        assert s not in text, s
    for f in text_string_to_metric_families(text):
        for sample in f.samples:
            for name, v in sample.labels.items():
                if name == "user":
                    assert v in USER_VALUES, v
                # Label values are short identifiers or route patterns, never free text.
                assert re.fullmatch(r"[A-Za-z0-9_./{}+-]{0,64}", v), (name, v)


async def test_metrics_bearer_token(gateway_client) -> None:  # type: ignore[no-untyped-def]
    token = "vg-metrics-token-for-prometheus"
    client = await gateway_client(metrics={"token_sha256": sha(token)})
    assert (await client.get("/metrics")).status == 401
    r = await client.get("/metrics", headers={"Authorization": "Bearer wrong"})
    assert r.status == 401
    assert (await r.json())["error"]["code"] == "invalid_api_key"
    assert (await client.get("/metrics", headers=auth())).status == 401  # a member token
    assert P + "requests_total" in await scrape(client, {"Authorization": f"Bearer {token}"})


async def test_metrics_disabled(gateway_client) -> None:  # type: ignore[no-untyped-def]
    client = await gateway_client(metrics={"enabled": False})
    assert (await client.get("/metrics")).status == 404


def test_metrics_on_own_port_with_token(gateway_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from support import free_port

    port, token = free_port(), "vg-port-metrics-token"
    g = gateway_process(metrics={"port": port, "token_sha256": sha(token)})
    with urllib.request.urlopen(g.url + "/healthz") as r:
        assert r.status == 200
    try:
        urllib.request.urlopen(g.url + "/metrics")
        raise AssertionError("/metrics must not be served on the API port")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        urllib.request.urlopen(url)
        raise AssertionError("the metrics port must ask for its token")
    except urllib.error.HTTPError as exc:
        assert exc.code == 401
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req) as r:
        text = r.read().decode()
    # The API port's requests are counted in the registry served on this port.
    assert f'{P}requests_total{{error_code="",route="/healthz",status_class="2xx"}}' in text


def test_label_guard_caps_free_text_labels() -> None:
    guard = LabelGuard()
    assert guard("upstream_timeout") == "upstream_timeout"
    assert guard("") == ""
    for bad in ("Bearer sk-abc", "x" * 49, "quota exceeded!", "Upper"):
        assert guard(bad) == OTHER
    for i in range(GUARD_LIMIT * 2):
        guard(f"code_{i}")
    assert guard("code_1") == "code_1"  # seen before the cap
    assert guard(f"code_{GUARD_LIMIT * 2 - 1}") == OTHER
    m = Metrics(["alice"])
    for i in range(500):
        m.requests.labels("/v1/images/variations", "5xx", f"upstream_{i}").inc()
        m.backend_errors.labels("openai", f"kind {i}").inc()
    text = m.exposition().decode()
    assert len([s for s in series(text) if s[0] == P + "requests_total"]) == GUARD_LIMIT + 1
    assert len([s for s in series(text) if s[0] == P + "backend_errors_total"]) == 1


def test_family_keeps_children_only_for_values_its_guard_passes() -> None:
    m = Metrics(["alice"])
    child = m.requests.labels("/v1/images/variations", "4xx", "invalid_value")
    assert m.requests.labels("/v1/images/variations", "4xx", "invalid_value") is child
    assert m.request_seconds.labels("/healthz") is m.request_seconds.labels("/healthz")
    # A value the guard maps to "other" reaches the "other" child and is not kept.
    other = m.requests.labels("/v1/images/variations", "5xx", "Not A Code")
    assert other is m.requests.labels("/v1/images/variations", "5xx", OTHER)
    assert len(m.requests._children) == 2
    other.inc()
    text = m.exposition().decode()
    assert (f'{P}requests_total{{error_code="other",route="/v1/images/variations",'
            f'status_class="5xx"}} 1.0') in text


def test_user_label_only_for_configured_members() -> None:
    m = Metrics(["alice", "bob"])
    assert m.user_label("alice") == "alice"
    assert m.user_label("anonymous") == "anonymous"
    for other in ("carol", "", None, "Alice"):
        assert m.user_label(other) == "_unknown"


def test_every_family_is_documented() -> None:
    docs = (ROOT / "docs" / "metrics.md").read_text()
    for name, (kind, labels) in FAMILIES.items():
        full = name + ("_total" if kind == "counter" else "")
        assert f"`{full}`" in docs, full
        for label in labels:
            assert f"`{label}`" in docs, (full, label)


def test_breaker_state_is_one_hot_and_down_only_when_open() -> None:
    m = Metrics([])
    for state, up in (("closed", 1.0), ("open", 0.0), ("half_open", 1.0), ("closed", 1.0)):
        m.set_breaker("b", state)
        got = {s: m.registry.get_sample_value(P + "backend_circuit_state",
                                              {"backend": "b", "state": s})
               for s in ("closed", "half_open", "open")}
        assert got == {s: float(s == state) for s in got}
        assert m.registry.get_sample_value(P + "backend_up", {"backend": "b"}) == up


async def test_overhead_leaves_out_every_wait_for_a_backend(
        gateway_client, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``request_overhead_seconds`` is the gateway's own time: a failed backend call and
    waiting for an identical request's call are backend time. The clock is moved 100 s
    while the backend holds, so the split shows without a timing assertion."""
    from instrumented_backend import register, vary

    from gateway.keys import METRICS

    offset = [0.0]
    real = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: real() + offset[0])
    start = register(monkeypatch, gateway_client)
    route = {"route": "/v1/images/variations"}

    async def check(fail: bool) -> None:
        client, backend = await start(fail=fail)
        registry = client.app[METRICS].registry

        def seconds(name: str) -> float:
            return registry.get_sample_value(P + name + "_sum", route) or 0.0

        backend.gate.clear()
        image = png_bytes(seed=5)
        requests = 2  # an owner and a waiter on its flight (which may fail)
        tasks = [asyncio.create_task(vary(client, image)) for _ in range(requests)]
        await eventually(lambda: backend.in_flight == 1 and registry.get_sample_value(
            P + "requests_in_flight") == requests, "every request at its wait")
        offset[0] += 100.0
        backend.gate.set()
        answers = await asyncio.gather(*tasks)
        assert [a.status for a in answers] == ([502, 502] if fail else [200, 200])
        assert seconds("request_duration_seconds") >= 100 * requests
        assert seconds("request_overhead_seconds") < 50, "backend time counted as overhead"
        await client.close()

    await check(fail=True)
    await check(fail=False)


def test_beyond_loopback_metrics_leave_the_api_port(gateway_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Issue 19, item 11: bound to 0.0.0.0 without metrics.token_sha256, ``serve``
    refuses to put /metrics (member names, spend) on the API port, with a sentence;
    with metrics.port it serves them there only."""
    import subprocess
    import sys

    import yaml
    from support import base_config, free_port

    exposed = {"host": "0.0.0.0", "public_base_url": "https://vg.example"}
    raw = base_config(tmp_path, server=exposed)
    config = tmp_path / "exposed.yaml"
    config.write_text(yaml.safe_dump(raw))
    for cmd in (["serve", "--config", str(config), "--port", "0"],
                ["check-config", str(config)]):
        out = subprocess.run([sys.executable, "-m", "gateway", *cmd], capture_output=True,
                             text=True, timeout=60, cwd=tmp_path)
        assert out.returncode == 2, (cmd, out.stdout, out.stderr)
        assert "metrics.token_sha256" in out.stderr and "metrics.port" in out.stderr
        assert "Traceback" not in out.stderr
    port = free_port()
    g = gateway_process(server=exposed, metrics={"port": port})
    try:
        urllib.request.urlopen(g.url + "/metrics")
        raise AssertionError("/metrics must not be served on the API port")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
        assert f"{P}requests_total" in r.read().decode()
