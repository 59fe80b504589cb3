"""Reloading the config file on SIGHUP (``systemctl reload``), with nothing in flight
dropped.

A reload applies what is read per request: members and their quotas, the admin token,
backends (with their pricing) and the route. The sections the running process was
built from (the listening socket and TLS, the stores, the audit, metrics, logging) need
a restart: a reload keeps their running values and warns, naming each changed key. An
invalid file, or a backend that cannot start, leaves the running config as it was and
logs the reason (a line number for a file error). Requests in flight finish with the
config they began with (:mod:`gateway.live`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import structlog
from aiohttp import web

from gateway.config import (
    DEFAULT_CONFIG_ENV,
    Config,
    ConfigError,
    env_names,
    read_config,
)
from gateway.keys import AUTH, LIVE, METRICS
from gateway.live import Snapshot
from gateway.router import Router

log = structlog.get_logger("gateway.reload")

# Sections the running process was built from: a reload keeps their running values.
RESTART_SECTIONS = ("server", "state", "cache", "images", "audit", "abuse", "metrics",
                    "logging")


def warn_env_is_the_starting_one(path: str | None) -> None:
    """A reload re-reads the file, not the environment: ``${NAME}`` keeps the value the
    process started with, so an edited systemd ``EnvironmentFile`` changes nothing until
    a restart. Said on every reload of a file that uses one (names only, never values)."""
    chosen = path or os.environ.get(DEFAULT_CONFIG_ENV)
    if not chosen:
        return
    try:
        names = env_names(Path(chosen).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return  # read_config has said why
    if names:
        log.warning("config_reload_env_unchanged", variables=names,
                    advice="these keep the values the process started with; after "
                           "changing them (an EnvironmentFile), restart instead")


def keep_restart_sections(running: Config, new: Config) -> tuple[Config, list[str]]:
    """``new`` with the restart-only sections of ``running``, and the keys (never their
    values) that the file changed there."""
    changed = []
    for section in RESTART_SECTIONS:
        ours, theirs = getattr(running, section), getattr(new, section)
        changed += [f"{section}.{f.name}" for f in dataclasses.fields(ours)
                    if getattr(ours, f.name) != getattr(theirs, f.name)]
    kept = {section: getattr(running, section) for section in RESTART_SECTIONS}
    return dataclasses.replace(new, **kept), changed


def _diff(old: Mapping[str, object], new: Mapping[str, object]) -> dict[str, list[str]]:
    return {"added": sorted(new.keys() - old.keys()),
            "removed": sorted(old.keys() - new.keys()),
            "changed": sorted(k for k in old.keys() & new.keys() if old[k] != new[k])}


def changes(old: Config, new: Config) -> dict[str, object]:
    """What a reload changes, by name: members, backends, route, auth keys. No value
    is shown (token hashes, upstream keys)."""
    out: dict[str, object] = {}
    for what, diff in (("users", _diff(old.users, new.users)),
                       ("backends", _diff({b.name: b for b in old.backends},
                                          {b.name: b for b in new.backends}))):
        out.update({f"{what}_{kind}": names for kind, names in diff.items() if names})
    if old.route != new.route:
        out["route"] = list(new.route)
    auth = [f"auth.{f.name}" for f in dataclasses.fields(old.auth)
            if getattr(old.auth, f.name) != getattr(new.auth, f.name)]
    if old.quota_defaults != new.quota_defaults:
        auth.append("quota_defaults")
    if auth:
        out["keys_changed"] = auth
    return out


class Reloader:
    """Applies the config file to a running app, one reload at a time.

    ``check`` refuses a config the process must not run (``cli.check_bind``: an open
    gateway beyond loopback) by raising :class:`ConfigError`.
    """

    def __init__(self, app: web.Application, path: str | None,
                 check: Callable[[Config], None] = lambda config: None) -> None:
        self._app = app
        self._path = path
        self._check = check
        self._lock = asyncio.Lock()

    async def reload(self) -> bool:
        """Read the file and apply it; False (and the running config kept) if it fails."""
        async with self._lock:
            metrics = self._app[METRICS]
            try:
                await self._apply()
            except ConfigError as exc:
                log.error("config_reload_failed", error=str(exc), kept="the running config")
            except Exception as exc:  # a backend that cannot start, the member store
                log.error("config_reload_failed", error=f"{type(exc).__name__}: {exc}",
                          kept="the running config")
            else:
                metrics.config_reloads.labels("applied").inc()
                return True
            metrics.config_reloads.labels("failed").inc()
            return False

    async def _apply(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, warn_env_is_the_starting_one, self._path)
        loaded, sha256 = await loop.run_in_executor(None, read_config, self._path)
        live = self._app[LIVE]
        running = live.current
        config, restart = keep_restart_sections(running.config, loaded)
        self._check(config)
        router = Router(config, self._app[METRICS], previous=running.router)
        try:
            await router.start()
            await self._app[AUTH].apply_config(config)
        except BaseException:
            await router.discard()
            raise
        await live.swap(Snapshot(config, router, time.time(), sha256, running.generation + 1))
        if restart:
            log.warning("config_reload_needs_restart", keys=restart,
                        kept="the running values of these keys until a restart")
        log.info("config_reloaded", sha256=sha256, reloads=running.generation + 1,
                 **changes(running.config, config))
