"""Per-user quotas: the rules every store applies (admission, reservations, refusals).

Two steps, so cache hits cost no images: :meth:`QuotaStore.admit` takes a request slot
(blocked users, the sliding requests-per-minute window, ``max_concurrent``) and
:meth:`QuotaStore.reserve` reserves images (day, month, USD budget) only when a backend
must generate. A reservation is committed for what was delivered, or refunded.

This package root holds the limits, their statuses, the refusal messages and the
:class:`QuotaStore` protocol; :mod:`gateway.quota.sqlite` keeps the ledger of one process
and :mod:`gateway.quota.redis` the ledger every replica shares. Both build statuses with
:func:`statuses` and refusals with the functions here, so each message exists once.
"""

from __future__ import annotations

import contextlib
import functools
import time
import uuid
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from gateway.auth import Principal
from gateway.config import QuotaLimits
from gateway.errors import ApiError

# A reset further away than this is "hours away": the SDK should not retry.
NO_RETRY_AFTER_SECONDS = 120


@dataclass(frozen=True, slots=True)
class LimitStatus:
    """One limit as ``/v1/usage`` and the ``x-ratelimit-*`` headers show it."""

    name: str
    limit: float | None
    used: float
    remaining: float | None
    reset_at: float | None  # unix seconds

    def as_json(self) -> dict[str, object]:
        return {
            "limit": self.limit,
            "used": self.used,
            "remaining": self.remaining,
            "resets_at": _iso(self.reset_at) if self.reset_at else None,
        }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``12ms``, ``1s``, ``6m0s``, ``5h3m0s``."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    s = int(seconds + 0.999)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


def day_bounds(now: float) -> tuple[str, float]:
    """Today's ledger period (UTC) and when it resets."""
    return periods(int(now // 86400))[:2]


def month_bounds(now: float) -> tuple[str, float]:
    """This calendar month's ledger period (UTC) and when it resets."""
    return periods(int(now // 86400))[2:]


@functools.lru_cache(maxsize=4)
def periods(day: int) -> tuple[str, float, str, float]:
    """Both periods of a UTC day number (a pure function: memoised, every request asks)."""
    start = datetime.fromtimestamp(day * 86400, UTC)
    month = start.replace(day=1)
    nxt = (month + timedelta(days=32)).replace(day=1)
    return (start.strftime("d:%Y-%m-%d"), (start + timedelta(days=1)).timestamp(),
            month.strftime("m:%Y-%m"), nxt.timestamp())


def image_headers(status: LimitStatus | None) -> dict[str, str]:
    """``x-ratelimit-*-images`` for the tightest image limit (none when unlimited)."""
    if status is None or status.limit is None:
        return {}
    now = time.time()
    return {
        "x-ratelimit-limit-images": str(int(status.limit)),
        "x-ratelimit-remaining-images": str(max(0, int(status.remaining or 0))),
        "x-ratelimit-reset-images": duration(max(0.0, (status.reset_at or now) - now)),
    }


def ratelimit_headers(statuses: list[LimitStatus]) -> dict[str, str]:
    """``x-ratelimit-*``: the tightest image limit, and the request limit when set."""
    headers = image_headers(tightest(statuses))
    rpm = next((s for s in statuses if s.name == "requests_per_minute"), None)
    if rpm is not None and rpm.limit is not None:
        now = time.time()
        headers.update({
            "x-ratelimit-limit-requests": str(int(rpm.limit)),
            "x-ratelimit-remaining-requests": str(max(0, int(rpm.remaining or 0))),
            "x-ratelimit-reset-requests": duration(max(0.0, (rpm.reset_at or now) - now)),
        })
    return headers


class QuotaRejected(ApiError):
    """A 429/403 from a limit; never shared with coalesced waiters."""

    def __init__(self, status: int, message: str, code: str, limit: str,
                 retry_after: float | None, headers: Mapping[str, str]) -> None:
        hdrs = dict(headers)
        should_retry: bool | None = None
        if retry_after is not None:
            hdrs["retry-after"] = str(max(1, int(retry_after + 0.999)))
            if retry_after > NO_RETRY_AFTER_SECONDS:
                should_retry = False
        if status == 403:
            should_retry = False
        super().__init__(status, message, code=code, headers=hdrs, should_retry=should_retry)
        self.limit = limit


def blocked_error(name: str) -> QuotaRejected:
    return QuotaRejected(403, f"Gateway user '{name}' is blocked; ask the gateway admin.",
                         "user_blocked", "blocked", None, {})


def _images_rejection(limit: str, status: LimitStatus, wanted: int) -> QuotaRejected:
    wait = max(0.0, (status.reset_at or time.time()) - time.time())
    what = {"images_per_day": "images per day (UTC)", "images_per_month":
            "images per calendar month (UTC)"}.get(limit, limit)
    message = (f"Quota exceeded: {int(status.limit or 0)} {what}. {int(status.remaining or 0)}"
               f" remaining, {wanted} requested; resets in {duration(wait)} at "
               f"{_iso(status.reset_at or time.time())}.")
    return QuotaRejected(429, message, "quota_exceeded", limit, wait, image_headers(status))


def _budget_rejection(status: LimitStatus, cost: float, headers: Mapping[str, str]
                      ) -> QuotaRejected:
    wait = max(0.0, (status.reset_at or time.time()) - time.time())
    return QuotaRejected(
        429, f"Quota exceeded: monthly budget of {status.limit or 0:.2f} USD; "
        f"{status.remaining or 0:.3f} USD remaining, this request needs {cost:.3f} USD; "
        f"resets in {duration(wait)}.", "quota_exceeded", status.name, wait, headers)


def rate_refusal(limit: str, q: QuotaLimits, wait: float, headers: Mapping[str, str]
                 ) -> QuotaRejected:
    """The 429 for a full request slot: ``requests_per_minute`` (free again in ``wait``
    seconds) or ``max_concurrent``."""
    if limit == "requests_per_minute":
        return QuotaRejected(
            429, f"Rate limit reached: {q.requests_per_minute} requests per minute; "
            f"0 remaining, resets in {duration(wait)}.", "rate_limit_exceeded", limit, wait,
            headers)
    return QuotaRejected(
        429, f"Rate limit reached: at most {q.max_concurrent} requests in flight at once; "
        "wait for one to finish.", "rate_limit_exceeded", "max_concurrent", 1, headers)


@dataclass(frozen=True)
class Usage:
    """What a store counted for one member at one moment, from which :func:`statuses`
    derives the limits: committed images and spend, what is held by reservations, the
    minute window and the requests in flight."""

    day_images: int
    month_images: int
    month_spend: float
    held_images: int
    held_cost: float
    window_count: int
    window_reset: float  # when the oldest request leaves the minute window (unix s)
    inflight: int


def statuses(q: QuotaLimits, usage: Usage, now: float) -> list[LimitStatus]:
    """Every limit of ``q`` as it stands with ``usage`` at ``now`` (unix seconds)."""
    _, day_reset, _, month_reset = periods(int(now // 86400))
    out = []
    for name, limit, used, reset in (
        ("images_per_day", q.images_per_day, usage.day_images + usage.held_images,
         day_reset),
        ("images_per_month", q.images_per_month, usage.month_images + usage.held_images,
         month_reset),
        ("budget_usd_per_month", q.budget_usd_per_month,
         round(usage.month_spend + usage.held_cost, 6), month_reset),
        ("requests_per_minute", q.requests_per_minute, usage.window_count,
         usage.window_reset),
        ("max_concurrent", q.max_concurrent, usage.inflight, None),
    ):
        remaining = None if limit is None else max(0, limit - used)
        out.append(LimitStatus(name, limit, used, remaining, reset))
    return out


def reservation_refusal(statuses: list[LimitStatus], images: int, cost: float,
                        fallback: str | None = None) -> QuotaRejected | None:
    """Why reserving ``images`` (``cost`` USD) is refused, or None if it fits.

    When several limits refuse, the one that resets last is reported: a client retrying
    at an earlier reset (tomorrow, with the month used up) would only be refused again.
    ``fallback`` names a limit that refused elsewhere (a Redis script) in case these
    statuses, read a moment later, no longer show it.
    """
    failing = [s for s in statuses if s.limit is not None and (
        (s.name in ("images_per_day", "images_per_month") and (s.remaining or 0) < images)
        or (s.name == "budget_usd_per_month" and (s.remaining or 0) < cost - 1e-9))]
    if not failing:
        if fallback is None:
            return None
        failing = [s for s in statuses if s.name == fallback]
    worst = max(failing, key=lambda s: s.reset_at or 0.0)
    if worst.name == "budget_usd_per_month":
        return _budget_rejection(worst, cost, ratelimit_headers(statuses))
    return _images_rejection(worst.name, worst, images)


def new_id() -> str:
    """A fresh reservation or slot id."""
    return uuid.uuid4().hex


@dataclass
class Reservation:
    """Images (and USD) held for one request until commit or refund.

    ``made_at`` (unix seconds) is when the hold was taken: the commit charges the day and
    month of that moment, so a request admitted at 23:59:59 whose backend answers after
    midnight is charged to the period whose quota admitted it. ``id`` names the hold in
    the store (a Redis lease), so any store settles any of its reservations."""

    user: str
    images: int
    cost: float
    size: str
    made_at: float
    id: str = field(default_factory=new_id)
    settled: bool = False


class QuotaStore(Protocol):
    """What the handler needs: :mod:`gateway.quota.sqlite` or :mod:`gateway.quota.redis`.
    Storage failures raise :class:`gateway.errors.StorageUnavailable`."""

    def admit(self, principal: Principal) -> contextlib.AbstractAsyncContextManager[None]: ...

    async def reserve(self, principal: Principal, images: int, cost: float, size: str
                      ) -> Reservation: ...

    async def commit(self, reservation: Reservation, images: int, cost: float) -> None: ...

    async def refund(self, reservation: Reservation) -> None: ...

    def refund_soon(self, reservation: Reservation) -> None:
        """:meth:`refund` without waiting for it (from a callback); never raises."""
        ...

    def count_request(self, principal: Principal, cache_hit: bool) -> Awaitable[None]:
        """Count one answered request (a cache hit or not). Returns at once: await the
        result before answering, after whatever else the answer waits for."""
        ...

    async def usage(self, principal: Principal) -> list[LimitStatus]: ...

    async def all_usage(self) -> dict[str, dict[str, float]]: ...

    async def is_blocked(self, name: str) -> bool: ...

    async def set_blocked(self, name: str, blocked: bool) -> None: ...

    async def close(self) -> None: ...


def tightest(statuses: list[LimitStatus]) -> LimitStatus | None:
    images = [s for s in statuses if s.name in ("images_per_day", "images_per_month")
              and s.limit is not None]
    return min(images, key=lambda s: s.remaining or 0, default=None)


BUDGETS = ("images_per_day", "images_per_month", "budget_usd_per_month")


def budget_used(statuses: list[LimitStatus]) -> float:
    """The share (0..1) of the member's tightest image or money budget that is used."""
    ratios = [s.used / s.limit for s in statuses if s.limit and s.name in BUDGETS]
    return min(1.0, max(ratios, default=0.0))
