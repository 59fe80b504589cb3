"""Per-user quotas (issue 3): exact under concurrency, refunded on failure and disconnect.

The backend is the test-only ``instrumented`` kind (see instrumented_backend.py): it
counts calls and in-flight requests and can hold calls at a gate, so "more than the
limit reached the backend" is observable rather than inferred from timing.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
import time
from typing import Any

import pytest
from instrumented_backend import Answer, Start, register, usage, vary
from support import ADMIN_TOKEN, TOKENS, eventually, png_bytes, sha

from gateway.keys import AUDIT, IMAGES, LIVE, QUOTA

DURATION = re.compile(r"^(\d+h)?(\d+m)?\d+s$|^\d+ms$")
ENVELOPE_KEYS = {"message", "type", "param", "code"}

# The backend's own prices (USD per image by size): budgets follow the backend that
# generated.
PRICES = {"256x256": 0.016, "512x512": 0.018, "1024x1024": 0.020}


@pytest.fixture
def instrumented(monkeypatch: pytest.MonkeyPatch, gateway_client: Any) -> Start:
    return register(monkeypatch, gateway_client)


def seconds_to_utc_midnight() -> float:
    now = time.time()
    return 86400 - now % 86400


def assert_image_headers(a: Answer, limit: int) -> None:
    assert a.headers["x-ratelimit-limit-images"] == str(limit)
    assert 0 <= int(a.headers["x-ratelimit-remaining-images"]) <= limit
    assert DURATION.match(a.headers["x-ratelimit-reset-images"]), a.headers


def assert_quota_429(a: Answer, limit: int) -> None:
    assert a.status == 429
    assert set(a.body["error"]) == ENVELOPE_KEYS
    assert a.body["error"]["code"] == "quota_exceeded"
    message = a.body["error"]["message"]
    assert "images per day" in message and "0 remaining" in message
    assert "resets in" in message
    assert_image_headers(a, limit)
    assert a.headers["x-ratelimit-remaining-images"] == "0"
    retry_after = int(a.headers["retry-after"])
    assert abs(retry_after - seconds_to_utc_midnight()) < 60
    if seconds_to_utc_midnight() > 180:  # the reset is hours away: the SDK must not retry
        assert a.headers["x-should-retry"] == "false"


async def burst(client: Any, count: int, first_seed: int = 0, **kwargs: Any
                ) -> list[asyncio.Task[Answer]]:
    """``count`` concurrent requests, each with its own image (all cache misses)."""
    return [asyncio.create_task(vary(client, png_bytes(seed=first_seed + i), **kwargs))
            for i in range(count)]


async def test_50_concurrent_n1_with_images_per_day_5(instrumented: Start) -> None:
    """Acceptance: exactly 5 x 200 and 45 x 429 with the right headers."""
    client, backend = await instrumented(quota_defaults={"images_per_day": 5})
    backend.gate.clear()  # admitted requests wait at the backend, reservations held
    tasks = await burst(client, 50)
    await eventually(lambda: sum(t.done() for t in tasks) + backend.in_flight >= 50,
                     "every request answered or at the backend")
    assert backend.in_flight == 5
    rejected = [t.result() for t in tasks if t.done()]
    assert len(rejected) == 45
    backend.gate.set()
    answers = await asyncio.gather(*tasks)
    ok = [a for a in answers if a.status == 200]
    assert len(ok) == 5
    for a in rejected:
        assert_quota_429(a, 5)
    for a in ok:
        assert len(a.body["data"]) == 1
        assert_image_headers(a, 5)
    assert sorted(int(a.headers["x-ratelimit-remaining-images"]) for a in ok)[0] == 0
    assert backend.calls == [1] * 5
    day = (await usage(client))["limits"]["images_per_day"]
    assert (day["used"], day["remaining"], day["limit"]) == (5, 0, 5)


async def test_50_concurrent_with_max_concurrent_2(instrumented: Start) -> None:
    """Acceptance: with max_concurrent: 2 the backend never has 3 requests in flight."""
    client, backend = await instrumented(
        quota_defaults={"images_per_day": 5, "max_concurrent": 2})
    backend.gate.clear()
    tasks = await burst(client, 50)
    await eventually(lambda: sum(t.done() for t in tasks) + backend.in_flight >= 50,
                     "every request answered or at the backend")
    assert backend.in_flight == 2
    for t in tasks:
        if t.done():
            a = t.result()
            assert a.status == 429 and a.body["error"]["code"] == "rate_limit_exceeded"
            assert "in flight" in a.body["error"]["message"]
            assert int(a.headers["retry-after"]) >= 1
            assert_image_headers(a, 5)
    backend.gate.set()
    first = await asyncio.gather(*tasks)
    assert sum(a.status == 200 for a in first) == 2
    # An ungated burst: still never 3 at the backend, never more than 5 images.
    second = await asyncio.gather(*await burst(client, 50, first_seed=50))
    assert backend.peak == 2
    ok = sum(a.status == 200 for a in first + second)
    assert ok <= 5
    assert {a.status for a in second} <= {200, 429}
    assert (await usage(client))["limits"]["images_per_day"]["used"] == ok == len(backend.calls)


async def test_failing_backend_charges_nothing(instrumented: Start) -> None:
    """Acceptance: after 20 failed requests the user's usage is 0 (reservations refunded).

    The limit is 5 images, so an unrefunded reservation would turn failure 6 onward into
    a 429 instead of reaching the backend.
    """
    client, backend = await instrumented(
        fail=True, quota_defaults={"images_per_day": 5, "budget_usd_per_month": 1.0})
    answers = []
    for wave in range(4):  # 4 waves of 5 concurrent failures
        answers += await asyncio.gather(
            *(vary(client, png_bytes(seed=wave * 5 + i)) for i in range(5)))
    assert [a.status for a in answers] == [502] * 20
    assert {a.body["error"]["code"] for a in answers} == {"upstream_error"}
    assert len(backend.calls) == 20
    limits = (await usage(client))["limits"]
    assert limits["images_per_day"]["used"] == 0
    assert limits["images_per_month"]["used"] == 0
    assert limits["budget_usd_per_month"]["used"] == 0
    async with client.get("/admin/usage",
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
        row = (await r.json())["users"]["alice"]
    assert row["images_today"] == 0 and row["spend_usd_this_month"] == 0



async def test_a_locked_state_file_is_a_503_that_charges_nothing(instrumented: Start) -> None:
    """An admin's sqlite3 shell holding the ledger's write lock: the commit fails after a
    short busy wait with a clear, unretried 503 (not a retried 500 that pays the
    backend again on each SDK retry), the hold is refunded, and service resumes."""
    client, _ = await instrumented(quota_defaults={"images_per_day": 5})
    shell = sqlite3.connect(client.app[LIVE].current.config.state.path, isolation_level=None)
    shell.execute("BEGIN IMMEDIATE")
    try:
        refused = await vary(client, png_bytes(seed=1))
    finally:
        shell.execute("ROLLBACK")
        shell.close()
    assert refused.status == 503, refused.body
    assert refused.body["error"]["code"] == "storage_unavailable"
    assert "nothing was charged" in refused.body["error"]["message"]
    assert refused.headers["x-should-retry"] == "false"
    assert _audited_status(client) == 503
    assert (await usage(client))["limits"]["images_per_day"]["used"] == 0
    assert (await vary(client, png_bytes(seed=2))).status == 200
    assert (await usage(client))["limits"]["images_per_day"]["used"] == 1

async def test_disconnect_while_generating_refunds(instrumented: Start) -> None:
    """A client that goes away while the backend works is not charged."""
    client, backend = await instrumented(quota_defaults={"images_per_day": 1})
    backend.gate.clear()
    task = asyncio.create_task(vary(client, png_bytes(seed=1)))
    await eventually(lambda: backend.in_flight == 1, "the request at the backend")
    task.cancel()  # closes the connection; the server cancels the handler
    await eventually(lambda: backend.in_flight == 0, "the handler cancelled")
    backend.gate.set()
    assert (await usage(client))["limits"]["images_per_day"]["used"] == 0
    a = await vary(client, png_bytes(seed=2))
    assert a.status == 200, a.body


async def test_disconnect_after_generating_is_charged_and_pooled(
        instrumented: Start, monkeypatch: Any) -> None:
    """Disconnecting after the backend answered but before the response (issue 19 item
    1): the images were delivered, so they are charged (once) and pooled; the re-sent
    upload is a HIT that costs nothing more. Before, the drop was refunded while the
    images stayed in the pool: free images."""
    client, backend = await instrumented(quota_defaults={"images_per_day": 1})
    store = client.app[IMAGES]
    entered, release = threading.Event(), threading.Event()
    original = store.put_file

    def slow_put_file(source: Any, image_id: str) -> str:
        entered.set()
        release.wait(10)
        return original(source, image_id)

    monkeypatch.setattr(store, "put_file", slow_put_file)
    try:
        task = asyncio.create_task(
            vary(client, png_bytes(seed=1), response_format="url"))
        await eventually(entered.is_set, "the response being rendered")
        task.cancel()
        await eventually(lambda: _audited_status(client) == 499, "the 499 audit record")
    finally:
        release.set()
    monkeypatch.setattr(store, "put_file", original)
    (row,) = [r for r in client.app[AUDIT].query(limit=10) if r["status"] == 499]
    assert row["images_charged"] == 1
    assert (await usage(client))["limits"]["images_per_day"]["used"] == 1
    again = await vary(client, png_bytes(seed=1))
    assert (again.status, again.headers["X-Cache"]) == (200, "HIT")
    assert (await usage(client))["limits"]["images_per_day"]["used"] == 1
    assert len(backend.calls) == 1


async def leave_during_the_commit(client: Any, monkeypatch: Any, fails: bool) -> None:
    """One request whose client leaves while the ledger commit is in flight; the commit
    then lands (or fails, with ``fails``) after the 499 is audited."""
    quota = client.app[QUOTA]
    entered, release = asyncio.Event(), asyncio.Event()
    original = quota.commit

    async def held_commit(reservation: Any, images: int, cost: float) -> None:
        landing = None if fails else asyncio.ensure_future(
            original(reservation, images, cost))
        entered.set()
        await release.wait()
        if landing is None:
            raise RuntimeError("the ledger's disk is full")
        await landing

    monkeypatch.setattr(quota, "commit", held_commit)
    task = asyncio.create_task(vary(client, png_bytes(seed=1)))
    await eventually(entered.is_set, "the commit in flight")
    task.cancel()
    await eventually(lambda: _audited_status(client) == 499, "the 499 audit record")
    release.set()
    monkeypatch.setattr(quota, "commit", original)


async def test_disconnect_during_the_commit_is_charged_and_audited_alike(
        instrumented: Start, monkeypatch: Any) -> None:
    """The client leaves while the ledger commit is in flight: the commit completes (the
    images were made), and the 499 audit row says they were charged."""
    client, _ = await instrumented(quota_defaults={"images_per_day": 5})
    await leave_during_the_commit(client, monkeypatch, fails=False)
    used = (await usage(client))["limits"]["images_per_day"]["used"]
    assert used == 1
    (row,) = [r for r in client.app[AUDIT].query(limit=10) if r["status"] == 499]
    assert row["images_charged"] == used


async def test_a_commit_that_fails_after_the_client_left_gives_the_hold_back(
        instrumented: Start, monkeypatch: Any) -> None:
    client, _ = await instrumented(quota_defaults={"images_per_day": 1})
    await leave_during_the_commit(client, monkeypatch, fails=True)
    # The one image of the day is not held for ever by the lost commit.

    async def given_back() -> bool:
        return (await usage(client))["limits"]["images_per_day"]["used"] == 0

    await eventually(given_back, "the reservation given back")
    assert (await vary(client, png_bytes(seed=2))).status == 200


def _audited_status(client: Any) -> int | None:
    rows = client.app[AUDIT].query(limit=1)
    return rows[0]["status"] if rows else None


async def test_cache_hits_cost_no_images_but_count_as_requests(instrumented: Start) -> None:
    client, backend = await instrumented(
        quota_defaults={"images_per_day": 5, "requests_per_minute": 3})
    image = png_bytes(seed=3)
    answers = [await vary(client, image) for _ in range(3)]
    assert [a.headers["X-Cache"] for a in answers] == ["MISS", "HIT", "HIT"]
    assert [a.headers["x-ratelimit-remaining-images"] for a in answers] == ["4", "4", "4"]
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["2", "1", "0"]
    assert {a.headers["x-ratelimit-limit-requests"] for a in answers} == {"3"}
    limited = await vary(client, image)
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert DURATION.match(limited.headers["x-ratelimit-reset-requests"])
    assert limited.status == 429
    assert limited.body["error"]["code"] == "rate_limit_exceeded"
    assert "3 requests per minute" in limited.body["error"]["message"]
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert "x-should-retry" not in limited.headers  # seconds away: the SDK may retry
    limits = (await usage(client))["limits"]
    assert limits["images_per_day"]["used"] == 1
    assert limits["requests_per_minute"]["used"] == 3
    assert limits["requests_per_minute"]["remaining"] == 0
    async with client.get("/admin/usage",
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
        row = (await r.json())["users"]["alice"]
    assert (row["requests_today"], row["cache_hits_today"], row["images_today"]) == (3, 2, 1)
    assert backend.calls == [1]


async def test_month_limit_and_partial_reservation(instrumented: Start) -> None:
    client, backend = await instrumented(
        quota_defaults={"images_per_day": None, "images_per_month": 3})
    assert (await vary(client, png_bytes(seed=1), n=2)).status == 200
    a = await vary(client, png_bytes(seed=2), n=2)
    assert a.status == 429 and a.body["error"]["code"] == "quota_exceeded"
    assert "calendar month" in a.body["error"]["message"]
    assert "1 remaining, 2 requested" in a.body["error"]["message"]
    assert a.headers["x-ratelimit-remaining-images"] == "1"
    assert (await vary(client, png_bytes(seed=2), n=1)).status == 200
    assert backend.calls == [2, 1]
    month = (await usage(client))["limits"]["images_per_month"]
    assert (month["used"], month["remaining"]) == (3, 0)
    assert month["resets_at"].endswith("-01T00:00:00Z")


async def test_the_refusal_names_the_limit_that_resets_last(instrumented: Start) -> None:
    """Day and month both used up: the 429 sends the client to the 1st of next month,
    since retrying tomorrow would only be refused again."""
    client, backend = await instrumented(
        quota_defaults={"images_per_day": 2, "images_per_month": 2})
    assert (await vary(client, png_bytes(seed=1), n=2)).status == 200
    a = await vary(client, png_bytes(seed=2), n=1)
    assert a.status == 429 and "calendar month" in a.body["error"]["message"]
    assert a.body["error"]["message"].rstrip(".").endswith("-01T00:00:00Z")
    assert int(a.headers["retry-after"]) > seconds_to_utc_midnight() or (
        time.gmtime(time.time() + 86400).tm_mday == 1)  # the last day of a month
    assert backend.calls == [2]


async def test_budget_usd_per_month(instrumented: Start) -> None:
    client, backend = await instrumented(
        pricing=PRICES, quota_defaults={"images_per_day": None, "budget_usd_per_month": 0.05})
    ok = [await vary(client, png_bytes(seed=i)) for i in range(3)]  # 3 x 0.016 at 256
    assert [a.status for a in ok] == [200] * 3
    a = await vary(client, png_bytes(seed=9))
    assert a.status == 429 and a.body["error"]["code"] == "quota_exceeded"
    assert "budget" in a.body["error"]["message"]
    budget = (await usage(client))["limits"]["budget_usd_per_month"]
    assert budget["used"] == 0.048
    assert len(backend.calls) == 3


async def test_config_blocked_user_gets_403(instrumented: Start) -> None:
    client, backend = await instrumented(users={
        "alice": {"token_sha256": _alice_sha(), "quota": {"blocked": True}}})
    a = await vary(client, png_bytes())
    assert a.status == 403 and a.body["error"]["code"] == "user_blocked"
    assert a.headers["x-should-retry"] == "false"
    assert (await usage(client))["blocked"] is True
    assert backend.calls == []


def _alice_sha() -> str:
    return sha(TOKENS["alice"])


async def test_usage_lists_every_limit(instrumented: Start) -> None:
    client, _ = await instrumented(pricing=PRICES, quota_defaults={
        "images_per_day": 10, "images_per_month": 100, "requests_per_minute": 30,
        "max_concurrent": 2, "budget_usd_per_month": 5.0})
    assert (await vary(client, png_bytes(), n=2)).status == 200
    body = await usage(client)
    assert body["user"] == "alice" and body["blocked"] is False
    limits = body["limits"]
    assert set(limits) == {"images_per_day", "images_per_month", "budget_usd_per_month",
                           "requests_per_minute", "max_concurrent"}
    assert limits["images_per_day"] | {"resets_at": None} == {
        "limit": 10, "used": 2, "remaining": 8, "resets_at": None}
    assert limits["images_per_month"]["remaining"] == 98
    assert limits["budget_usd_per_month"]["used"] == 0.032
    assert limits["requests_per_minute"]["used"] == 1
    assert limits["max_concurrent"]["used"] == 0  # this usage call is not a variation
    bob = await usage(client, "bob")
    assert bob["limits"]["images_per_day"]["used"] == 0


async def test_ledger_additions_of_one_loop_turn_share_one_upsert_per_row(tmp_path: Any
                                                                          ) -> None:
    """16 answered requests in one turn are two upserts per member, and exact."""
    from gateway.auth import Principal
    from gateway.config import QuotaLimits
    from gateway.quota.sqlite import SqliteQuota

    quota = SqliteQuota(tmp_path / "quota.sqlite3")
    alice, bob = (Principal(name, QuotaLimits(), True) for name in ("alice", "bob"))
    statements: list[str] = []
    quota._db.set_trace_callback(statements.append)
    reservation = await quota.reserve(alice, 3, 0.054, "512x512")
    writes: list[Any] = [asyncio.ensure_future(quota.commit(reservation, 3, 0.054))]
    writes += [quota.count_request(alice, cache_hit=i % 2 == 0) for i in range(16)]
    writes.append(quota.count_request(bob, cache_hit=False))
    await asyncio.gather(*writes)
    assert sum(s.startswith("INSERT INTO ledger") for s in statements) == 4  # 2 users x 2
    assert statements.count("BEGIN IMMEDIATE") == 1
    usage = await quota.all_usage()
    assert usage["alice"] == {"images_today": 3, "images_this_month": 3,
                              "requests_today": 16, "cache_hits_today": 8,
                              "spend_usd_this_month": 0.054}
    assert usage["bob"]["requests_today"] == 1
    used = {s.name: s.used for s in await quota.usage(alice)}
    assert used["images_per_day"] == 3  # committed once: not also still reserved
    await quota.close()


async def test_a_failed_ledger_batch_fails_its_callers_and_changes_nothing(tmp_path: Any
                                                                           ) -> None:
    from gateway.auth import Principal
    from gateway.config import QuotaLimits
    from gateway.errors import StorageUnavailable
    from gateway.quota.sqlite import SqliteQuota

    quota = SqliteQuota(tmp_path / "quota.sqlite3")
    alice = Principal("alice", QuotaLimits(), True)
    assert {s.name: s.used for s in await quota.usage(alice)}["images_per_day"] == 0
    reservation = await quota.reserve(alice, 2, 0.036, "512x512")
    quota._db.execute("PRAGMA query_only=ON")  # every write fails from here
    results = await asyncio.gather(asyncio.ensure_future(quota.commit(reservation, 2, 0.036)),
                                   quota.count_request(alice, cache_hit=False),
                                   return_exceptions=True)
    # translated where they happen: the store's one error, the SQLite failure as its cause
    assert all(isinstance(r, StorageUnavailable)
               and isinstance(r.__cause__, sqlite3.OperationalError) for r in results), results
    assert not reservation.settled  # the handler refunds it
    await quota.refund(reservation)
    assert {s.name: s.used for s in await quota.usage(alice)}["images_per_day"] == 0
    quota._db.execute("PRAGMA query_only=OFF")
    await quota.count_request(alice, cache_hit=True)  # the next turn's batch is new
    assert (await quota.all_usage())["alice"]["requests_today"] == 1
    await quota.close()


# 2025-01-31 23:59:59 UTC: the last second of a day and of a month.
LAST_SECOND_OF_JANUARY = 1738367999.0


async def test_a_commit_after_midnight_charges_the_reservations_day_and_month(
        tmp_path: Any) -> None:
    """Issue 19 item 4: admitted at 23:59:59 on the last day of a month, answered after
    midnight: the images count on that day and month, not on the next ones."""
    from gateway.auth import Principal
    from gateway.config import QuotaLimits
    from gateway.quota.sqlite import SqliteQuota

    now = [LAST_SECOND_OF_JANUARY]
    quota = SqliteQuota(tmp_path / "quota.sqlite3", clock=lambda: now[0])
    alice = Principal("alice", QuotaLimits(images_per_day=5), True)
    reservation = await quota.reserve(alice, 2, 0.04, "256x256")
    now[0] += 6  # the backend answers at 00:00:05 on 1 February
    await quota.commit(reservation, 2, 0.04)
    rows = dict(quota._db.execute("SELECT period, images FROM ledger WHERE user='alice'"))
    assert rows == {"d:2025-01-31": 2, "m:2025-01": 2}
    used = {s.name: s.used for s in await quota.usage(alice)}
    assert used["images_per_day"] == 0 and used["images_per_month"] == 0  # a new period
    now[0] = LAST_SECOND_OF_JANUARY
    assert (await quota.all_usage())["alice"]["images_today"] == 2
    await quota.close()
