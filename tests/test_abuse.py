"""abuse_suspected (issue 3): many distinct end users, or limits hit again and again."""

from __future__ import annotations

import re
import tracemalloc
from typing import Any

import pytest
import structlog
from instrumented_backend import Start, register, vary
from support import png_bytes

from gateway.abuse import memory as abuse
from gateway.abuse.memory import AbuseMonitor
from gateway.config import AbuseConfig


@pytest.fixture
def instrumented(monkeypatch: pytest.MonkeyPatch, gateway_client: Any) -> Start:
    return register(monkeypatch, gateway_client)


async def abuse_counter(client: Any, reason: str, member: str) -> float:
    async with client.get("/metrics") as r:
        text = await r.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or "abuse_suspected" not in line:
            continue
        if f'reason="{reason}"' in line and re.search(rf'"{member}"', line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def suspected(logs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["member"], e["reason"]) for e in logs if e["event"] == "abuse_suspected"]


async def test_many_distinct_end_users(instrumented: Start) -> None:
    client, _ = await instrumented(abuse={"distinct_end_users": 4, "window_seconds": 600})
    image = png_bytes()
    with structlog.testing.capture_logs() as logs:
        for user in ("u1", "u2", "u1", "u3", "u2"):  # 3 distinct: not yet
            await vary(client, image, user=user)
        await vary(client, image, user="u4", token_user="bob")  # bob's, not alice's
        assert suspected(logs) == []
        await vary(client, image, user="u4")  # alice's 4th distinct value
        await vary(client, image, user="u5")  # once per window, not per request
    assert suspected(logs) == [("alice", "many_end_users")]
    event = next(e for e in logs if e["event"] == "abuse_suspected")
    assert (event["count"], event["window_seconds"]) == (4, 600)
    assert event["log_level"] == "warning"
    assert await abuse_counter(client, "many_end_users", "alice") == 1


async def test_repeated_limit_hits(instrumented: Start) -> None:
    client, _ = await instrumented(abuse={"limit_hits": 3},
                                   quota_defaults={"images_per_day": 1})
    with structlog.testing.capture_logs() as logs:
        assert (await vary(client, png_bytes(seed=1))).status == 200
        for seed in (2, 3):
            assert (await vary(client, png_bytes(seed=seed))).status == 429
        assert suspected(logs) == []
        assert (await vary(client, png_bytes(seed=4))).status == 429
    assert suspected(logs) == [("alice", "repeated_limit_hits")]
    assert await abuse_counter(client, "repeated_limit_hits", "alice") == 1


def test_window_slides() -> None:
    """Old observations leave the window; a new window may raise again."""
    monitor = AbuseMonitor(AbuseConfig(window_seconds=60, distinct_end_users=3, limit_hits=2))
    assert monitor.observe("alice", "a", False, now=1000) == []
    assert monitor.observe("alice", "b", False, now=1030) == []
    assert monitor.observe("alice", "c", False, now=1070) == []  # "a" has left the window
    raised = monitor.observe("alice", "d", False, now=1080)
    assert [(s.reason, s.count) for s in raised] == [("many_end_users", 3)]
    assert monitor.observe("alice", "e", False, now=1100) == []  # raised this window
    assert monitor.observe("alice", "f", False, now=1141) == []  # only e, f are recent
    again = monitor.observe("alice", "g", False, now=1150)
    assert [s.reason for s in again] == ["many_end_users"]
    assert monitor.observe(None, "x", True, now=1141) == []
    assert monitor.observe("bob", None, True, now=1200) == []
    assert [s.reason for s in monitor.observe("bob", None, True, now=1201)] == [
        "repeated_limit_hits"]


def test_state_stays_bounded_under_a_flood(monkeypatch: pytest.MonkeyPatch) -> None:
    """A member's flood keeps O(1) state: every observation used to be kept for the
    whole window (and counted again on each request), so a busy member made each later
    request slower and the process larger."""
    monkeypatch.setattr(abuse, "MAX_TRACKED_END_USERS", 50)
    monitor = AbuseMonitor(AbuseConfig(window_seconds=600, distinct_end_users=20,
                                       limit_hits=5))
    raised: list[tuple[str, str, int]] = []
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(50_000):  # 100 s of one artist's requests, all hitting a limit
            found = monitor.observe("alice", "artist-7", True, now=1000 + i / 500)
            found += monitor.observe("bob", f"scripted-{i}", False, now=1000 + i / 500)
            raised += [(s.member, s.reason, s.count) for s in found]
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 256 * 1024, f"abuse state grew by {grown} bytes"
    assert sorted(raised) == [("alice", "repeated_limit_hits", 5),
                              ("bob", "many_end_users", 20)]
    # Past the tracking bound the count is a floor, and a later window raises again.
    again = monitor.observe("bob", "scripted-new", False, now=1000 + 650)
    assert [(s.reason, s.count) for s in again] == [("many_end_users", 50)]
