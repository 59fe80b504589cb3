"""Prometheus metrics, one registry per app (no module-level collectors).

Cardinality is bounded by construction:

* ``user`` is only ever a member (named in the config or made by the admin through
  the admin API: both bounded by the admin), ``anonymous`` (``auth.mode: none``) or
  ``_unknown``: :meth:`Metrics.user_label` maps everything else there. The
  free-form ``user`` form field, tokens and their digests are never labels.
* ``route`` is the canonical pattern of a registered route (``unmatched`` for 404s).
* ``backend`` is a configured backend name; ``size``, ``limit``, ``result``, ``state``,
  ``reason`` and ``control`` come from fixed sets in the code.
* ``error_code`` and the backend error ``kind`` come from the code too, but a backend
  may map upstream answers into them, so both pass a :class:`LabelGuard`: a fixed shape
  and at most :data:`GUARD_LIMIT` distinct values, the rest counted as ``other``.

The gateway is one process with one event loop (see docs/architecture.md, "Process
model"), so there is no multiprocess mode: each instance is scraped on its own and
dashboards sum instances.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase

# ``*_created`` series double every counter's series count for no dashboard use.
disable_created_metrics()

P = "variations_gateway_"
# Up to 300 s: AI backends' timeouts are 150-300 s, and a quantile cannot exceed the top.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                   30, 60, 120, 180, 300)
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1,
                    0.25, 1)
UPLOAD_BUCKETS = (16e3, 64e3, 256e3, 512e3, 1e6, 2e6, 3e6, 4e6)
BREAKER_STATES = ("closed", "half_open", "open")
# The fixed label sets of gateway.quota (``QuotaRejected.limit``) and gateway.abuse.
QUOTA_LIMITS = ("blocked", "requests_per_minute", "max_concurrent", "images_per_day",
                "images_per_month", "budget_usd_per_month")
ABUSE_REASONS = ("many_end_users", "repeated_limit_hits")
UNKNOWN_USER = "_unknown"
ANONYMOUS_USER = "anonymous"
OTHER = "other"
GUARD_LIMIT = 64
_LABEL_SHAPE = re.compile(r"[a-z0-9_]{0,48}")

M = TypeVar("M", bound=MetricWrapperBase)


class LabelGuard:
    """Caps one label: values of a fixed shape, at most ``limit`` distinct, else ``other``."""

    def __init__(self, limit: int = GUARD_LIMIT) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        v = value or ""
        if v in self._seen:
            return v
        if len(self._seen) >= self._limit or not _LABEL_SHAPE.fullmatch(v):
            return OTHER
        self._seen.add(v)
        return v


class Family(Generic[M]):
    """A labelled family whose children, once made, are found in a dict.

    prometheus_client's ``labels()`` checks and stringifies its arguments under a lock
    on every call, and a request makes seven. Call sites use it like the family itself:
    ``.labels(...)`` (positional values) returns the child. ``guarded`` names a label
    that passes a :class:`LabelGuard`; ``labelnames`` are then the names the metric was
    made with (in that order). Only values the guard lets through unchanged are kept in
    the dict, so the dict is as bounded as the family's series. No series is ever
    removed here; one that was (``metric.remove``) would need its child dropped too.
    """

    def __init__(self, metric: M, labelnames: Sequence[str] = (),
                 guarded: str | None = None) -> None:
        self.metric = metric
        self._index = None if guarded is None else list(labelnames).index(guarded)
        self._guard = LabelGuard()
        self._children: dict[tuple[str, ...], M] = {}

    def labels(self, *values: str) -> M:
        child = self._children.get(values)
        if child is not None:
            return child
        if self._index is not None:
            fixed = list(values)
            fixed[self._index] = self._guard(fixed[self._index])
            if tuple(fixed) != values:
                return self.metric.labels(*fixed)
        child = self._children[values] = self.metric.labels(*values)
        return child

    def remove(self, *values: str) -> None:
        """Drop one series (and its remembered child), if it exists."""
        self._children.pop(values, None)
        with contextlib.suppress(KeyError):
            self.metric.remove(*values)


class Metrics:
    """All metric families of one gateway instance.

    ``members`` are the user names in the config (the only ``user`` label values besides
    ``anonymous`` and ``_unknown``); their per-member counters start at 0. The router
    reports every backend's breaker state at start and on each change.
    """

    def __init__(self, members: Iterable[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._members: frozenset[str] = frozenset({ANONYMOUS_USER})
        self._request_families(self.registry)
        self._member_families(self.registry)
        self._backend_families(self.registry)
        self._cache_stats: tuple[int, int] = (0, 0)
        self.registry.register(_CacheCollector(self))
        self.config_reloads = Family(Counter(
            P + "config_reloads_total", "Config reloads (SIGHUP) by result: applied, or "
            "failed (the running config kept).", ["result"], registry=self.registry))
        for result in ("applied", "failed"):
            self.config_reloads.labels(result)
        self.set_members(members)

    def set_members(self, members: Iterable[str]) -> None:
        """The members that are ``user`` labels (the authenticator's, at start and on each
        change, a reload's included). A removed member's series stay: history, not state."""
        names = frozenset(members)
        for name in names - self._members:  # series start at 0: increase() sees the first
            for family in (self.user_requests, self.images_by_user, self.spend_usd):
                family.labels(name)
            for limit in QUOTA_LIMITS:
                self.quota_rejections.labels(limit, name)
            for reason in ABUSE_REASONS:
                self.abuse_suspected.labels(reason, name)
        self._members = names | {ANONYMOUS_USER}

    def _request_families(self, r: CollectorRegistry) -> None:
        """Requests (the middleware in gateway.app), images and the cache
        (gateway.variations)."""
        request_labels = ("route", "status_class", "error_code")
        self.requests = Family(Counter(
            P + "requests_total", "HTTP requests answered, by route pattern, status class "
            "and the OpenAI error code ('' when none).", request_labels, registry=r),
            request_labels, guarded="error_code")
        self.request_seconds = Family(Histogram(
            P + "request_duration_seconds", "Whole request time, receipt to response.",
            ["route"], buckets=LATENCY_BUCKETS, registry=r))
        self.overhead_seconds = Family(Histogram(
            P + "request_overhead_seconds",
            "Whole request time minus backend time: the gateway's own cost.",
            ["route"], buckets=OVERHEAD_BUCKETS, registry=r))
        self.in_flight = Gauge(P + "requests_in_flight", "Requests being handled now.",
                               registry=r)
        self.upload_bytes = Histogram(P + "upload_bytes", "Size of uploaded images in bytes.",
                                      buckets=UPLOAD_BUCKETS, registry=r)
        self.images_generated = Family(Counter(P + "images_generated_total",
                                               "Images generated by a backend.",
                                               ["backend", "size"], registry=r))
        self.images_from_cache = Family(Counter(
            P + "images_served_from_cache_total",
            "Images answered from the cache (no backend call).", ["size"], registry=r))
        self.cache_lookups = Family(Counter(
            P + "cache_lookups_total", "Cache lookups by result: hit, partial, miss, bypass.",
            ["result"], registry=r))
        self.cache_saved_usd = Counter(P + "cache_saved_usd_total",
                                       "Estimated spend avoided by cache hits, in USD.",
                                       registry=r)
        self.variation_controls = Family(Counter(
            P + "variation_controls_total", "Variation requests that set a control beyond "
            "OpenAI's contract (strength, seed, prompt), counted once per control.",
            ["control"], registry=r))
        for control in ("strength", "seed", "prompt"):  # start at 0
            self.variation_controls.labels(control)

    def _member_families(self, r: CollectorRegistry) -> None:
        """Members: quotas, images, spend; audit and abuse (gateway.app)."""
        self.quota_rejections = Family(Counter(P + "quota_rejections_total",
                                               "Requests refused by a quota, rate limit or block.",
                                               ["limit", "user"], registry=r))
        self.user_requests = Family(Counter(P + "user_requests_total",
                                            "Authenticated API requests by member.", ["user"],
                                            registry=r))
        self.images_by_user = Family(Counter(P + "user_images_total",
                                             "Generated images charged to a member.", ["user"],
                                             registry=r))
        self.spend_usd = Family(Counter(P + "user_spend_usd_total",
                                        "Estimated upstream spend charged to a member, in USD.",
                                        ["user"], registry=r))
        self.user_budget_ratio = Family(Gauge(
            P + "user_budget_used_ratio",
            "Share of the member's tightest image or money budget used (0..1), read from "
            "the quota store every 5 s and on each of the member's requests.", ["user"],
            registry=r))
        self.audit_events = Counter(P + "audit_events_total", "Audit records written.",
                                    registry=r)
        self.audit_errors = Counter(P + "audit_write_errors_total",
                                    "Audit records that could not be written.", registry=r)
        self.audit_outbox_records = Gauge(
            P + "audit_outbox_records", "Audit records committed to this replica's local "
            "outbox and not yet shipped to PostgreSQL (0 with audit.kind: sqlite).",
            registry=r)
        self.audit_outbox_oldest_age = Gauge(
            P + "audit_outbox_oldest_age_seconds", "Age of the oldest audit record waiting "
            "in the outbox (0 when it is empty).", registry=r)
        self.abuse_suspected = Family(Counter(P + "abuse_suspected_total",
                                              "abuse_suspected events (many_end_users, "
                                              "repeated_limit_hits).", ["reason", "user"],
                                              registry=r))

    def _backend_families(self, r: CollectorRegistry) -> None:
        """Backends (gateway.router) and the stores' free space."""
        self.backend_seconds = Family(Histogram(P + "backend_request_duration_seconds",
                                                "Time of one backend call, retries included.",
                                                ["backend"], buckets=LATENCY_BUCKETS, registry=r))
        self.normalise_seconds = Family(Histogram(
            P + "backend_normalise_seconds",
            "Gateway time turning one backend call's answers into stored PNGs (decode, "
            "fit, encode); part of request_overhead_seconds, not of backend time.",
            ["backend"], buckets=OVERHEAD_BUCKETS, registry=r))
        error_labels = ("backend", "kind")
        self.backend_errors = Family(Counter(
            P + "backend_errors_total", "Failed backend attempts by kind (timeout, connect, "
            "http_5xx, ..., circuit_open).", error_labels, registry=r), error_labels,
            guarded="kind")
        self.backend_retries = Family(Counter(
            P + "backend_retries_total", "Retried backend attempts.", ["backend"], registry=r))
        self.breaker_state = Family(Gauge(
            P + "backend_circuit_state", "Circuit breaker state: 1 for the current state, "
            "else 0.", ["backend", "state"], registry=r))
        self.backend_up = Family(Gauge(
            P + "backend_up", "0 while the backend's circuit is open, else 1 (closed or "
            "half-open).", ["backend"], registry=r))
        # The upstream model's published lifecycle (gateway.lifecycle): plain gauges,
        # because a withdrawn announcement removes its series.
        self.model_shutdown = Gauge(
            P + "backend_model_shutdown_timestamp_seconds",
            "Unix time of the shutdown_date (midnight UTC) the upstream announces for the "
            "backend's model, read at start and every 6 h; no series while none is "
            "announced.", ["backend"], registry=r)
        self.model_available = Gauge(
            P + "backend_model_available",
            "1 while the upstream's GET /models/{model} answers the backend's model, 0 once "
            "it answers model_not_found (retired); no series before the first reading or "
            "for upstreams that publish no model records.", ["backend"], registry=r)
        self.storage_free = Family(Gauge(
            P + "storage_free_ratio",
            "Free share of the file system under each local store (state, cache, images, "
            "audit), read every 5 s: a full disk stops caching, image URLs, the ledger "
            "and the audit trail.", ["store"], registry=r))

    def user_label(self, member: str | None) -> str:
        """``member`` if named in the config (or ``anonymous``), else ``_unknown``."""
        return member if member is not None and member in self._members else UNKNOWN_USER

    def set_outbox(self, records: int, oldest_ts: float | None, now: float) -> None:
        self.audit_outbox_records.set(records)
        self.audit_outbox_oldest_age.set(0 if oldest_ts is None else max(0.0, now - oldest_ts))

    def set_cache_stats(self, entries: int, total_bytes: int) -> None:
        self._cache_stats = (entries, total_bytes)

    def set_breaker(self, backend: str, state: str) -> None:
        """Record the breaker state of ``backend`` (one of :data:`BREAKER_STATES`)."""
        if state not in BREAKER_STATES:
            raise ValueError(f"unknown breaker state {state!r}")
        for s in BREAKER_STATES:
            self.breaker_state.labels(backend, s).set(1 if s == state else 0)
        # Half-open is not "down": the cooldown is over and the next request tries it.
        # Otherwise an idle night after one outage would keep BackendDown firing.
        self.backend_up.labels(backend).set(0 if state == "open" else 1)
        # Exposed from the start (zero counts), so its panels read 0, not "no data",
        # for a backend that has not answered yet or never converts (procedural).
        self.normalise_seconds.labels(backend)

    def forget_backend(self, backend: str) -> None:
        """Drop the state gauges of a backend a reload removed (its counters stay)."""
        for state in BREAKER_STATES:
            self.breaker_state.remove(backend, state)
        self.backend_up.remove(backend)
        self.set_model_lifecycle(backend, None, None)

    def set_model_lifecycle(self, backend: str, available: bool | None,
                            shutdown: float | None) -> None:
        """The lifecycle gauges of ``backend``; None removes the series (unknown, or
        no date announced)."""
        for gauge, value in ((self.model_available, available), (self.model_shutdown, shutdown)):
            if value is None:
                with contextlib.suppress(KeyError):
                    gauge.remove(backend)
            else:
                gauge.labels(backend).set(float(value))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _CacheCollector:
    """Cache size as gauges, read from the last refreshed stats."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def describe(self) -> list[GaugeMetricFamily]:
        return []

    def collect(self) -> list[GaugeMetricFamily]:
        entries, total = self._m._cache_stats
        e = GaugeMetricFamily(P + "cache_entries", "Cache keys (image pools) stored.",
                              value=entries)
        b = GaugeMetricFamily(P + "cache_bytes", "Bytes of cached images.", value=total)
        return [e, b]
