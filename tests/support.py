"""Test support: configs, real gateway processes, in-process apps, test images.

Plain helpers are imported as `from support import ...`; the fixtures are re-exported
by conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import io
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from PIL import Image

from gateway.app import build_app
from gateway.config import Config, build_config

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI") == "true"
TOKENS = {"alice": "vg-test-alice-token", "bob": "vg-test-bob-token"}
ADMIN_TOKEN = "vg-test-admin-token"
DEADLINE_S = 10.0
T = TypeVar("T")


class NotInTime(AssertionError, TimeoutError):
    """What :func:`eventually` raises: a failed test, and a timeout to callers that wait
    for a process (``except TimeoutError`` there keeps working)."""


def _not_in_time(what: str | Callable[[], str], deadline_s: float) -> NotInTime:
    return NotInTime(f"not within {deadline_s} s: {what() if callable(what) else what}")


async def eventually(predicate: Callable[[], T | Awaitable[T]], what: str | Callable[[], str],
                     deadline_s: float = DEADLINE_S, interval_s: float = 0.01) -> T:
    """Poll ``predicate`` (plain or async) until it returns something truthy; return it.

    The one way a test waits for something to happen: polled against a deadline, so a
    slow machine waits longer and a fast one does not wait at all, and no test sleeps
    for readiness or asserts how long anything took. After ``deadline_s`` it fails with
    ``what`` (a callable is asked then, so it can show the last value seen). The
    predicate may raise to stop waiting early (a process that died, say).
    """
    deadline = time.monotonic() + deadline_s
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise _not_in_time(what, deadline_s)
        await asyncio.sleep(interval_s)  # poll interval, bounded by the deadline


def eventually_sync(predicate: Callable[[], T], what: str | Callable[[], str],
                    deadline_s: float = DEADLINE_S, interval_s: float = 0.02) -> T:
    """:func:`eventually` for code with no event loop (a test driving a subprocess)."""
    deadline = time.monotonic() + deadline_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise _not_in_time(what, deadline_s)
        time.sleep(interval_s)  # poll interval, bounded by the deadline
    return value


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(size: int = 64, mode: str = "RGB", seed: int = 0, **save: Any) -> bytes:
    """A recognisable square test image (gradient + shapes) in ``mode``."""
    img = Image.new("RGB", (size, size))
    px = img.load()
    assert px is not None
    for y in range(size):
        for x in range(size):
            px[x, y] = ((x * 255 // max(1, size - 1) + seed * 40) % 256,
                        (y * 255 // max(1, size - 1)) % 256, (x + y + seed * 7) % 256)
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, "PNG", **save)
    return buf.getvalue()


def base_config(tmp: Path, **sections: Any) -> dict[str, Any]:
    """A token-auth config in ``tmp`` with alice and bob; ``sections`` override keys."""
    raw: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "auth": {"mode": "tokens", "admin_token_sha256": sha(ADMIN_TOKEN)},
        "users": {
            "alice": {"token_sha256": sha(TOKENS["alice"])},
            "bob": {"token_sha256": sha(TOKENS["bob"])},
        },
        "quota_defaults": {"images_per_day": 1000, "images_per_month": None,
                           "requests_per_minute": None, "max_concurrent": None},
        "state": {"kind": "sqlite", "path": str(tmp / "state.sqlite3")},
        "cache": {"enabled": True, "dir": str(tmp / "cache")},
        "images": {"dir": str(tmp / "images"), "url_ttl_seconds": 3600},
        # Threads, not the default process pool: spawning worker processes for every
        # gateway a test starts cost more than the rest of most tests. A test that needs
        # the process pool names it.
        "backends": [{"name": "local", "kind": "procedural", "executor": "thread"}],
        "route": ["local"],
        "audit": {"path": str(tmp / "audit.sqlite3")},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    def make(**sections: Any) -> Config:
        return build_config(base_config(tmp_path, **sections))
    return make


@pytest.fixture
async def gateway_client(aiohttp_client, make_config):  # type: ignore[no-untyped-def]
    """An in-process gateway: ``await gateway_client(**sections)`` -> aiohttp TestClient."""
    async def start(**sections: Any):  # type: ignore[no-untyped-def]
        return await aiohttp_client(build_app(make_config(**sections)))
    return start


def auth(user: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[user]}"}


@dataclass
class GatewayProcess:
    """A real ``variations-gateway serve`` process on a free loopback port."""

    url: str
    proc: subprocess.Popen[bytes]
    config_path: Path
    log_path: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        return stop_process(self.proc, timeout, sig)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def multipart_body(fields: dict[str, str], image: bytes, boundary: str) -> bytes:
    """A ``/v1/images/variations`` form: the text ``fields``, then ``image`` as a PNG."""
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'
             f"{v}\r\n".encode() for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
                 f'filename="a.png"\r\nContent-Type: image/png\r\n\r\n'.encode() + image
                 + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts)


def build_wheel(names: list[str], tmp: Path) -> Path:
    """``pip wheel`` from a copy of just ``names`` (paths in the repository) in ``tmp``,
    as a build that sees only those files would: returns the wheel."""
    src = tmp / "src"
    src.mkdir()
    for name in names:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet",
                          "wheel", "--no-deps", "-w", str(tmp / "dist"), str(src)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    (wheel,) = (tmp / "dist").glob("variations_gateway-*.whl")
    return wheel


def stop_process(proc: subprocess.Popen[Any], timeout: float = 15,
                 sig: int = signal.SIGTERM) -> int:
    """Ask ``proc`` to stop with ``sig``; SIGKILL it if it has not within ``timeout``.
    Returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def wait_http(url: str, deadline_s: float = 30, proc: subprocess.Popen[bytes] | None = None,
              context: ssl.SSLContext | None = None) -> None:
    """Poll ``url`` until it answers 200 (no sleeps standing in for readiness);
    ``context`` verifies an https server."""
    last: list[OSError] = []

    def answers() -> bool:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as r:
                return r.status == 200
        except OSError as exc:
            last[:] = [exc]
            return False

    eventually_sync(answers, lambda: f"{url} answering 200 (last error: {last})", deadline_s,
                    interval_s=0.05)


def start_gateway(raw_config: dict[str, Any], workdir: Path, port: int | None = None,
                  env: dict[str, str] | None = None, ca_file: Path | None = None
                  ) -> GatewayProcess:
    """Start ``serve`` on ``port`` (a free one by default) and wait for /healthz. With
    ``server.tls_cert`` set the URL is https and ``ca_file`` (the CA that signed the
    certificate) verifies it."""
    port = port or free_port()
    raw = {**raw_config, "server": {**raw_config.get("server", {}), "port": port}}
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / f"gateway-{port}.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    log_path = workdir / f"gateway-{port}.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config_path)],
        cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})})
    tls = bool(raw["server"].get("tls_cert"))
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    context = ssl.create_default_context(cafile=str(ca_file)) if tls and ca_file else None
    try:
        wait_http(url + "/healthz", proc=proc, context=context)
    except Exception:
        proc.kill()
        raise RuntimeError("gateway did not start:\n" + log_path.read_text()) from None
    return GatewayProcess(url, proc, config_path, log_path)


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """``gateway_process(**sections)`` starts a real gateway; all are stopped at the end."""
    started: list[GatewayProcess] = []

    def start(workdir: Path | None = None, ca_file: Path | None = None,
              **sections: Any) -> GatewayProcess:
        g = start_gateway(base_config(tmp_path, **sections), workdir or tmp_path,
                          ca_file=ca_file)
        started.append(g)
        return g

    yield start
    for g in started:
        with contextlib.suppress(Exception):
            g.stop()
