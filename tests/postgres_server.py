"""A real PostgreSQL (Debian's ``postgresql`` package) for the audit tests.

Its own cluster (``initdb``) in a temporary directory, on a free loopback port, run as a
non-root user (PostgreSQL refuses root; the tests run as root in CI): ``nobody``, set
by Popen's ``user``/``group`` (what ``runuser`` does, without a process in between). Unix
sockets go to the cluster's directory; 127.0.0.1 uses trust auth. Readiness is a
connection polled against a deadline. :meth:`stop` and :meth:`start` keep the data and
the port, for the outage tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support import IN_CI, eventually_sync, free_port, stop_process

RUN_AS = "nobody"


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _as_user() -> dict[str, Any]:
    """Popen arguments that drop root for :data:`RUN_AS` (as ``runuser`` would, but the
    child is postgres itself, so :meth:`PostgresServer.stop`'s signal reaches it)."""
    if os.geteuid() != 0:
        return {}
    return {"user": RUN_AS, "group": pwd.getpwnam(RUN_AS).pw_gid, "extra_groups": []}


@dataclass
class PostgresServer:
    """One ``postgres`` process over its own data directory."""

    workdir: Path
    bindir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def database(self, name: str) -> str:
        """A fresh database ``name`` (dropped first if a test made it before): its DSN."""
        self.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        self.sql(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def init(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            entry = pwd.getpwnam(RUN_AS)
            os.chown(self.workdir, entry.pw_uid, entry.pw_gid)
        r = subprocess.run([str(self.bindir / "initdb"), "-D", str(self.workdir / "data"),
                            "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"],
                           capture_output=True, text=True, timeout=120, cwd=self.workdir,
                           **_as_user())
        assert r.returncode == 0, r.stdout + r.stderr

    def start(self, deadline_s: float = 30) -> None:
        log = open(self.workdir / "postgres.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(self.bindir / "postgres"), "-D", str(self.workdir / "data"),
             "-p", str(self.port), "-h", "127.0.0.1", "-k", str(self.workdir),
             "-c", "fsync=off", "-c", "max_connections=60"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, **_as_user())
        log.close()
        proc, last = self.proc, []

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {proc.returncode}: "
                                   + (self.workdir / "postgres.log").read_text()[-2000:])
            try:
                self.sql("SELECT 1")
                return True
            except Exception as exc:
                last[:] = [exc]
                return False

        eventually_sync(ready, lambda: f"postgres answering (last: {last})", deadline_s,
                        interval_s=0.05)

    def stop(self) -> None:
        """A fast shutdown (SIGINT): open connections are cut, as in an outage."""
        if self.proc is not None:
            import signal
            stop_process(self.proc, 30, signal.SIGINT)
            self.proc = None

    def sql(self, statement: str, database: str = "postgres") -> list[tuple[object, ...]]:
        """Run one statement (autocommit); its rows."""
        import asyncpg

        async def run() -> list[tuple[object, ...]]:
            conn = await asyncpg.connect(host="127.0.0.1", port=self.port, user="postgres",
                                         database=database, timeout=5)
            try:
                return [tuple(r) for r in await conn.fetch(statement)]
            finally:
                await conn.close()

        return asyncio.run(run())


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the session (tests make their own databases)."""
    bindir = pg_bin()
    if bindir is None:
        message = ("PostgreSQL is not installed (make test installs Debian's postgresql: "
                   "scripts/install-system-deps.sh)")
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    # Not under pytest's base temp: pytest keeps that 0700 for root, which the
    # unprivileged server could not enter.
    workdir = Path(tempfile.mkdtemp(prefix="vg-postgres-"))
    server = PostgresServer(workdir, bindir)
    try:
        server.init()
        server.start()
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
