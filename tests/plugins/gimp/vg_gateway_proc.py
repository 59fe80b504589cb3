"""Start the real gateway (``python -m gateway serve``) as a process for the plug-in tests.

Used by tests/plugins/test_gimp_client.py and test_gimp_e2e.py (imported through
``sys.path``: tests have no packages here).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests"))
import support  # noqa: E402  (tests/ has no packages: found through sys.path)
from support import free_port  # noqa: E402  (re-exported for the plug-in tests)

READY_DEADLINE = 30.0


sha256 = support.sha  # re-exported for the plug-in tests


@dataclass
class Gateway:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


def write_config(
    tmp: Path,
    users: Mapping[str, Mapping[str, Any]],
    backends: list[dict[str, Any]] | None = None,
    auth_mode: str = "tokens",
) -> Path:
    """``users``: name -> {"token": ..., "quota": {...}} (quota optional)."""
    cfg: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 8080, "public_base_url": None},
        "auth": {"mode": auth_mode, "admin_token_sha256": None},
        "users": {
            name: {"token_sha256": sha256(u["token"]),
                   **({"quota": dict(u["quota"])} if u.get("quota") else {})}
            for name, u in users.items()
        },
        "quota_defaults": {"images_per_day": 100, "images_per_month": None,
                           "requests_per_minute": 200, "max_concurrent": 4},
        "state": {"kind": "sqlite", "path": str(tmp / "state.sqlite3")},
        "cache": {"enabled": True, "dir": str(tmp / "cache")},
        "images": {"dir": str(tmp / "images"), "url_ttl_seconds": 3600},
        "backends": backends or [{"name": "local", "kind": "procedural"}],
        "route": [b["name"] for b in (backends or [{"name": "local"}])],
        "audit": {"path": str(tmp / "audit.sqlite3")},
    }
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@contextlib.contextmanager
def running_gateway(tmp: Path, config: Path, host: str = "127.0.0.1") -> Iterator[Gateway]:
    """The gateway on a free port, ready (``/healthz`` 200) or a failed test."""
    port = free_port()
    log = tmp / "gateway.log"
    env = dict(os.environ)
    env.pop("VARIATIONS_GATEWAY_CONFIG", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config),
             "--host", host, "--port", str(port)],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    gw = Gateway(f"http://{host}:{port}", port, proc, log)
    try:
        try:
            support.wait_http(gw.url + "/healthz", READY_DEADLINE, proc=proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}:\n{gw.log_text()}") from None
        yield gw
    finally:
        support.stop_process(proc)


def post_variations(
    url: str, token: str, png: bytes, n: int, size: str, fresh: bool = False,
    extra: Mapping[str, str] | None = None,
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """A reference request made without the plug-in's client (for comparisons);
    ``extra``: the gateway's own fields (strength, seed, prompt, model)."""
    boundary = "----test-boundary-7d1c"
    body = support.multipart_body({"n": str(n), "size": size, "response_format": "b64_json",
                                   **(extra or {})}, png, boundary)
    headers = {"Authorization": f"Bearer {token}",
               "Content-Type": f"multipart/form-data; boundary={boundary}"}
    if fresh:
        headers["Cache-Control"] = "no-cache"
    req = urllib.request.Request(url + "/v1/images/variations", data=body,
                                 headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read())


@contextlib.contextmanager
def raw_server(answer: bytes) -> Iterator[str]:
    """A TCP server that reads each HTTP request whole, writes ``answer`` verbatim (not
    necessarily HTTP) and closes the connection; yields its base URL."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            f = conn.makefile("rb")
            length = 0
            while True:
                line = f.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            f.read(length)
            # A client may hang up before the end (one that caps what it reads).
            with contextlib.suppress(OSError):
                conn.sendall(answer)
                conn.shutdown(socket.SHUT_WR)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop.set()
        t.join()
        srv.close()
