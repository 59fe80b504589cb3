"""No process outlives the gateway: its procedural workers and multiprocessing's
resource tracker go when it goes, however it goes (issue 19, item 15)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from support import base_config, eventually_sync, free_port, stop_process, wait_http

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads the process tree from /proc")


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of ``pid`` from /proc, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces
    return fields[0], int(fields[1])


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            parents.setdefault(st[1], []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (a zombie waiting for its reaper has exited)."""
    return {p for p in pids if (st := _stat(p)) is not None and st[0] not in ("Z", "X")}


def wait_exited(children: set[int]) -> None:
    eventually_sync(lambda: not alive(children),
                    lambda: f"the gateway's children {alive(children)} to exit", 30)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[], tuple[subprocess.Popen[bytes], Path, str]]]:
    """Start ``serve`` (in a session of its own, as a terminal job would be) without
    waiting for it; every process it made is killed at the end whatever happened."""
    procs: list[subprocess.Popen[bytes]] = []
    seen: set[int] = set()

    def start() -> tuple[subprocess.Popen[bytes], Path, str]:
        port = free_port()
        raw = base_config(tmp_path)
        raw["server"] = {"host": "127.0.0.1", "port": port}
        raw["backends"] = [{"name": "local", "kind": "procedural", "executor": "process",
                            "workers": 2}]
        cfg = tmp_path / "g.yaml"
        cfg.write_text(yaml.safe_dump(raw))
        log = tmp_path / "serve.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(cfg)],
                cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc, log, f"http://127.0.0.1:{port}"

    def track(proc: subprocess.Popen[bytes]) -> None:
        seen.update(descendants(proc.pid))

    start.track = track  # type: ignore[attr-defined]
    yield start
    for proc in procs:
        stop_process(proc, 10, signal.SIGKILL)
    for pid in alive(seen):  # a leak the test has already reported: clean it up
        os.kill(pid, signal.SIGKILL)


def test_kill_9_of_the_gateway_takes_its_workers_and_the_tracker_with_it(serve) -> None:
    proc, _log, url = serve()
    wait_http(url + "/healthz", proc=proc)
    children = descendants(proc.pid)
    serve.track(proc)
    # two procedural workers and multiprocessing's resource tracker
    assert len(children) >= 3, children
    proc.kill()
    proc.wait(10)
    wait_exited(children)


def test_sigterm_during_start_up_leaves_nothing_running(serve) -> None:
    proc, log, _url = serve()
    eventually_sync(lambda: any(b"spawn_main" in cmdline(p) for p in descendants(proc.pid))
                    or proc.poll() is not None, "the first worker process", 30)
    children = descendants(proc.pid)
    serve.track(proc)
    proc.send_signal(signal.SIGTERM)  # mid start-up: the workers are still warming up
    assert proc.wait(30) == 0, log.read_text()
    wait_exited(children)
    assert "Traceback" not in log.read_text()


def test_ctrl_c_prints_no_worker_tracebacks(serve) -> None:
    """Ctrl-C signals the terminal's whole process group, workers included."""
    proc, log, url = serve()
    wait_http(url + "/healthz", proc=proc)
    children = descendants(proc.pid)
    serve.track(proc)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(30) == 0
    wait_exited(children)
    text = log.read_text()
    assert "shutting down" in text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
