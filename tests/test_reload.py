"""Reloading the config on SIGHUP (gateway/reload.py, gateway/live.py).

A real gateway process holds 50 requests at a fake upstream while the config file gains
a member, changes a quota and changes the backend's settings; SIGHUP; all 50 finish
(their backend is retired only after them), the new member and quota apply at once, and
an invalid file then leaves the gateway as it was, with a line-numbered error logged.
In-process tests pin the pieces: what a snapshot swap closes and when, what a reload
takes over, keeps for a restart, or refuses.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from fakes_upstreams import OpenAIVariationsFake
from instrumented_backend import variation_form
from structlog.testing import capture_logs
from support import ADMIN_TOKEN, TOKENS, GatewayProcess, base_config, eventually, png_bytes, sha
from upstream_cases import GATEWAY_UPSTREAM, backend_entry

from gateway.app import build_app
from gateway.backends.base import Backend
from gateway.config import build_config
from gateway.errors import StorageUnavailable
from gateway.keys import AUTH, LIVE, METRICS
from gateway.live import Live, Snapshot
from gateway.reload import Reloader, keep_restart_sections
from gateway.router import Router

CAROL = "vg-test-carol-token"
IN_FLIGHT = 50


async def post(session: aiohttp.ClientSession, gateway: GatewayProcess, token: str
               ) -> int:
    async with session.post(gateway.url + "/v1/images/variations",
                            data=variation_form(png_bytes(32)),
                            headers={"Authorization": f"Bearer {token}",
                                     "Cache-Control": "no-store"}) as r:
        await r.read()
        return r.status


async def get_json(session: aiohttp.ClientSession, url: str, token: str | None = None
                   ) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.get(url, headers=headers) as r:
        return r.status, await r.json(content_type=None)


def rewrite(gateway: GatewayProcess, raw: dict[str, Any]) -> None:
    port = int(gateway.url.rsplit(":", 1)[1])
    gateway.config_path.write_text(yaml.safe_dump({**raw, "server": {**raw["server"],
                                                                      "port": port}}))


async def reloaded(gateway: GatewayProcess, event: str, count: int) -> None:
    gateway.proc.send_signal(signal.SIGHUP)
    await eventually(lambda: gateway.log().count(event) >= count, f"{event} logged")


async def test_sighup_during_50_requests_in_flight(
        gateway_process: Any, held_upstream: tuple[OpenAIVariationsFake, str],
        tmp_path: Path) -> None:
    fake, url = held_upstream
    up = backend_entry("openai", url, timeout_seconds=60, **GATEWAY_UPSTREAM)
    gateway = gateway_process(backends=[up], route=["up"])
    async with aiohttp.ClientSession() as session:
        _, before = await get_json(session, gateway.url + "/readyz")
        flights = [asyncio.create_task(post(session, gateway, TOKENS["alice"]))
                   for _ in range(IN_FLIGHT)]
        await eventually(lambda: fake.arrived == IN_FLIGHT, "50 requests held upstream")

        # A new member, a changed quota, and the backend rebuilt (another timeout).
        raw = base_config(tmp_path, backends=[{**up, "timeout_seconds": 61}], route=["up"])
        raw["users"]["carol"] = {"token_sha256": sha(CAROL)}
        raw["users"]["alice"]["quota"] = {"images_per_day": 7}
        rewrite(gateway, raw)
        await reloaded(gateway, "config_reloaded", 1)

        assert not any(f.done() for f in flights)  # still held, on the old backend
        status, usage = await get_json(session, gateway.url + "/v1/usage", CAROL)
        assert status == 200 and usage["user"] == "carol"
        _, usage = await get_json(session, gateway.url + "/v1/usage", TOKENS["alice"])
        assert usage["limits"]["images_per_day"]["limit"] == 7
        assert "backend_retired" not in gateway.log()  # the old one serves the 50
        fake.gate.set()
        statuses = await asyncio.gather(*flights)
        assert statuses == [200] * IN_FLIGHT
        await eventually(lambda: "backend_retired" in gateway.log(), "old backend closed")
        assert await post(session, gateway, CAROL) == 200  # on the new backend
        _, after = await get_json(session, gateway.url + "/readyz")
        assert after["checks"]["config"]["sha256"] != before["checks"]["config"]["sha256"]

        # An invalid file: a line-numbered error, and the gateway as it was.
        gateway.config_path.write_text(gateway.config_path.read_text().replace(
            "images_per_day: 7", "images_per_day: seven"))
        await reloaded(gateway, "config_reload_failed", 1)
        line = next(ln for ln in gateway.log().splitlines() if "config_reload_failed" in ln)
        assert "line " in line and "images_per_day" in line
        assert await post(session, gateway, CAROL) == 200
        _, usage = await get_json(session, gateway.url + "/v1/usage", TOKENS["alice"])
        assert usage["limits"]["images_per_day"]["limit"] == 7
        _, kept = await get_json(session, gateway.url + "/readyz")
        assert kept["checks"]["config"] == after["checks"]["config"]
        async with session.get(gateway.url + "/metrics") as r:
            text = await r.text()
        assert 'variations_gateway_config_reloads_total{result="applied"} 1.0' in text
        assert 'variations_gateway_config_reloads_total{result="failed"} 1.0' in text
    assert CAROL not in gateway.log() and sha(CAROL) not in gateway.log()


class Spy:
    """Records a backend's close() (wrapping the real one)."""

    def __init__(self, backend: Backend) -> None:
        self.closed = 0
        self._close = backend.close

        async def close() -> None:
            self.closed += 1
            await self._close()
        backend.close = close  # type: ignore[method-assign]


def configs(tmp_path: Path, **sections: Any) -> Any:
    return build_config(base_config(tmp_path, **sections))


async def test_a_retired_backend_closes_after_the_requests_holding_it(tmp_path: Path) -> None:
    old_config = configs(tmp_path)
    old = Router(old_config)
    await old.start()
    live = Live(Snapshot(old_config, old, 0.0))
    spy = Spy(old.backends["local"])
    new_config = configs(tmp_path, backends=[
        {"name": "local", "kind": "procedural", "executor": "thread", "timeout_seconds": 5}])
    with live.hold() as held:
        new = Router(new_config, previous=old)
        await new.start()
        await live.swap(Snapshot(new_config, new, 1.0))
        assert live.current.router is new and held.router is old
        assert new.backends["local"] is not old.backends["local"]
        assert spy.closed == 0 and live.draining == 1  # a request still holds it
    await eventually(lambda: spy.closed == 1, "the old backend closed once released")
    assert live.draining == 0
    await live.close()
    assert spy.closed == 1


async def test_an_unchanged_backend_is_taken_over_running(tmp_path: Path) -> None:
    old_config = configs(tmp_path)
    old = Router(old_config)
    await old.start()
    old.guard("local").breaker.failure()
    live = Live(Snapshot(old_config, old, 0.0))
    spy = Spy(old.backends["local"])
    # Only pricing and the retry policy change: same instance, breaker and queue.
    new_config = configs(tmp_path, backends=[{
        "name": "local", "kind": "procedural", "executor": "thread",
        "pricing": {"256x256": 0.5}, "retry": {"max_attempts": 1}}])
    new = Router(new_config, previous=old)
    await new.start()
    await live.swap(Snapshot(new_config, new, 1.0))
    assert new.backends["local"] is old.backends["local"]
    assert new.guard("local").breaker is old.guard("local").breaker
    assert new.guard("local").breaker.failures == 1
    assert new.guard("local").policy.config.max_attempts == 1
    assert spy.closed == 0
    await live.close()
    assert spy.closed == 1


def write(path: Path, raw: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(raw))


async def test_reload_applies_members_and_keeps_restart_only_keys(
        tmp_path: Path, aiohttp_client: Any) -> None:
    raw = base_config(tmp_path)
    path = tmp_path / "gateway.yaml"
    write(path, raw)
    client = await aiohttp_client(build_app(build_config(raw)))
    app = client.server.app
    reloader = Reloader(app, str(path))
    raw["users"]["carol"] = {"token_sha256": sha(CAROL)}
    raw["server"] = {**raw["server"], "port": 9, "read_timeout_seconds": 5}
    raw["route"] = ["local"]
    write(path, raw)
    with capture_logs() as logs:
        assert await reloader.reload()
    events = {e["event"]: e for e in logs}
    assert events["config_reload_needs_restart"]["keys"] == [
        "server.port", "server.read_timeout_seconds"]
    assert events["config_reloaded"]["users_added"] == ["carol"]
    assert app[LIVE].current.config.server.port == 0  # the running value kept
    assert app[LIVE].current.generation == 1
    assert [p.name for p in app[AUTH].principals()] == ["alice", "bob", "carol"]
    assert app[METRICS].user_label("carol") == "carol"
    r = await client.get("/v1/usage", headers={"Authorization": f"Bearer {CAROL}"})
    assert r.status == 200
    assert sha(CAROL) not in json.dumps(logs, default=str)


async def test_reload_refuses_what_the_running_process_must_not_run(
        tmp_path: Path, aiohttp_client: Any) -> None:
    raw = base_config(tmp_path)
    path = tmp_path / "gateway.yaml"
    client = await aiohttp_client(build_app(build_config(raw)))
    app = client.server.app
    running = app[LIVE].current

    def refuse(config: Any) -> None:  # as cli.check_bind does for auth.mode: none
        from gateway.config import ConfigError
        if config.auth.mode == "none":
            raise ConfigError("not on this address", "auth.mode")
    reloader = Reloader(app, str(path), refuse)
    for text in ("users: [\n  oops", yaml.safe_dump({**raw, "users": {}, "auth": {
            "mode": "none"}})):
        path.write_text(text)
        with capture_logs() as logs:
            assert not await reloader.reload()
        (failed,) = [e for e in logs if e["event"] == "config_reload_failed"]
        assert app[LIVE].current is running
    assert "auth.mode" in failed["error"]
    r = await client.get("/v1/usage", headers={"Authorization": f"Bearer {TOKENS['bob']}"})
    assert r.status == 200
    r = await client.get("/admin/usage", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert r.status == 200


async def test_a_reload_the_member_store_fails_changes_nothing(
        tmp_path: Path, aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store failing mid-reload (SQLite locked, a Redis blip) is reported as "kept
    the running config": the authenticator must then still hold the running admin token
    and members, not the new file's."""
    raw = base_config(tmp_path)
    path = tmp_path / "gateway.yaml"
    client = await aiohttp_client(build_app(build_config(raw)))
    app = client.server.app
    new_admin = "vg-test-new-admin-token"
    raw["auth"] = {**raw["auth"], "admin_token_sha256": sha(new_admin)}
    raw["users"]["carol"] = {"token_sha256": sha(CAROL)}
    write(path, raw)
    members = app[AUTH].members
    assert members is not None

    async def locked(*args: Any, **kwargs: Any) -> bool:
        raise StorageUnavailable(sqlite3.OperationalError("database is locked"))
    monkeypatch.setattr(members.store, "swap", locked)
    with capture_logs() as logs:
        assert not await Reloader(app, str(path)).reload()
    assert [e["event"] for e in logs] == ["config_reload_failed"]
    for token, status in ((ADMIN_TOKEN, 200), (new_admin, 403)):
        r = await client.get("/admin/usage", headers={"Authorization": f"Bearer {token}"})
        assert r.status == status, token
    r = await client.get("/v1/usage", headers={"Authorization": f"Bearer {CAROL}"})
    assert r.status == 401
    assert [p.name for p in app[AUTH].principals()] == ["alice", "bob"]


def test_restart_only_sections_keep_their_running_values(tmp_path: Path) -> None:
    running = configs(tmp_path)
    new = configs(tmp_path, metrics={"port": 9100}, quota_defaults={"images_per_day": 5})
    kept, changed = keep_restart_sections(running, new)
    assert changed == ["metrics.port"]
    assert kept.metrics == running.metrics and kept.quota_defaults.images_per_day == 5


async def test_a_reload_of_a_file_using_env_warns_they_keep_their_starting_values(
        tmp_path: Path, aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`systemctl reload` after editing the EnvironmentFile changed nothing, silently: a
    reload re-reads the file with the environment the process started with."""
    raw = base_config(tmp_path)
    path = tmp_path / "gateway.yaml"
    write(path, raw)
    client = await aiohttp_client(build_app(build_config(raw)))
    reloader = Reloader(client.server.app, str(path))
    with capture_logs() as logs:
        assert await reloader.reload()
    assert "config_reload_env_unchanged" not in {e["event"] for e in logs}

    monkeypatch.setenv("VG_CAROL_SHA", sha(CAROL))
    monkeypatch.setenv("VG_RPM", "60")
    raw["users"]["carol"] = {"token_sha256": "${VG_CAROL_SHA}"}
    raw["quota_defaults"]["requests_per_minute"] = "${VG_RPM:-30}"
    path.write_text("# ${NOT_IN_A_VALUE} is a comment\n" + yaml.safe_dump(raw)
                    .replace("'${VG_RPM:-30}'", "${VG_RPM:-30}"))
    with capture_logs() as logs:
        assert await reloader.reload()
    (warning,) = [e for e in logs if e["event"] == "config_reload_env_unchanged"]
    assert warning["log_level"] == "warning"
    assert sorted(warning["variables"]) == ["VG_CAROL_SHA", "VG_RPM"]
    assert "restart" in warning["advice"]
    assert sha(CAROL) not in json.dumps(logs, default=str)
