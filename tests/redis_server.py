"""A real ``redis-server`` on a free loopback port, for tests of the Redis state.

No persistence by default (``--save '' --appendonly no``): a restart is an empty Redis.
Readiness is a PING polled against a deadline, never a sleep.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from support import eventually_sync, free_port, stop_process

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@dataclass
class RedisServer:
    """One redis-server process; :meth:`stop` and :meth:`start` keep the same port."""

    workdir: Path
    port: int = field(default_factory=free_port)
    # Append-only file fsynced per write: a SIGKILL loses no acknowledged write, as in
    # a deployment whose ledger must survive a Redis restart.
    persist: bool = False
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, deadline_s: float = 15) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / f"redis-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.persist else "no", "--appendfsync", "always",
             "--dir", str(self.workdir)],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        proc = self.proc
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        last: list[redis.RedisError] = []

        def pong() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}")
            try:
                return bool(client.ping())
            except redis.RedisError as exc:
                last[:] = [exc]
                return False

        try:
            eventually_sync(pong, lambda: f"redis-server answering PING (last: {last})",
                            deadline_s)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: the crash case, no goodbye to connected clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)


def require_redis_server() -> None:
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed (make test installs it: "
                    "scripts/install-system-deps.sh)")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh, empty Redis for one test; stopped at teardown."""
    require_redis_server()
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.stop()
