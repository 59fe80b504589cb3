"""Real GIMP 3 (issue 22): cancelling Generate Variations while the gateway's backend is
still working. GIMP's progress Cancel ends the plug-in process
(``gimp_plug_in_progress_cancel_callback`` -> ``gimp_plug_in_close(plug_in, TRUE)``,
which SIGKILLs it); the test does the same to the plug-in process of a real
``gimp-console-3`` while its request waits on a ComfyUI held busy. The gateway sees the
disconnect, cancels the ComfyUI job, refunds the reservation and audits the request as
charged nothing; the image is left as it was. Same roots as test_gimp_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "gimp"))

from fakes_upstreams import ComfyUIFake  # noqa: E402
from support import eventually_sync, free_port, stop_process  # noqa: E402
from test_gimp_e2e import (  # noqa: E402
    GIMP_TIMEOUT,
    GimpRoot,
    gimp_env,
    gimp_root,  # noqa: F401 - fixture
    root_builds,  # noqa: F401 - fixture
)
from upstream_cases import KEY, backend_entry  # noqa: E402
from vg_gateway_proc import running_gateway, write_config  # noqa: E402

from gateway import gimp_install  # noqa: E402

ALICE = "alice-cancel-token-3c9e1a7b5d2f4e60"
pytestmark = pytest.mark.slow


@contextlib.contextmanager
def served_in_thread(fake: ComfyUIFake) -> Iterator[str]:
    """The fake on its own event loop in a thread, so a synchronous test (driving GIMP)
    can hold it busy while the gateway process talks to it."""
    loop = asyncio.new_event_loop()
    port = free_port()
    runner = web.AppRunner(fake.app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(fake.release)
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


def plugin_pids(marker: str) -> list[int]:
    """Processes running the plug-in from this test's own profile (found by the unique
    workspace path in their command line)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"generate-variations.py" in part and marker.encode() in part for part in cmd):
            pids.append(int(entry.name))
    return pids


def audit_rows(path: Path) -> list[tuple[str, int, int]]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT request_id, status, images_charged FROM audit "
                          "WHERE route = '/v1/images/variations'").fetchall()


def used_today(url: str) -> int:
    req = urllib.request.Request(url + "/v1/usage",
                                 headers={"Authorization": f"Bearer {ALICE}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return int(json.loads(r.read())["limits"]["images_per_day"]["used"])


def test_cancel_ends_the_plugin_the_backend_job_and_the_charge(
        gimp_root: GimpRoot,  # noqa: F811 - the fixture imported above
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    # Busy until cancelled: the prompt runs and its history never says it is done.
    fake = ComfyUIFake(KEY, pending_polls=10**9)
    inner = f"/tmp/vg-cancel-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    host = gimp_root.path / inner.lstrip("/")
    (host / "out").mkdir(parents=True)
    try:
        with served_in_thread(fake) as comfy_url:
            cfg = write_config(tmp_path, {"alice": {"token": ALICE, "quota": {
                "images_per_day": 50, "requests_per_minute": 100, "max_concurrent": 2}}},
                backends=[backend_entry("comfyui", comfy_url, timeout_seconds=300.0,
                                        poll_interval_seconds=0.2)])
            with running_gateway(tmp_path, cfg) as gw:
                assert gimp_install.main([host / "profile"], False, "linux", {},
                                         tmp_path_factory.mktemp("home")) == 0
                shutil.copy(HERE / "gimp" / "e2e_cancel.py", host / "e2e_cancel.py")
                (host / "job.json").write_text(json.dumps({
                    "out": f"{inner}/out", "url": gw.url, "token": ALICE,
                    "plugin_dir": f"{inner}/profile/plug-ins/generate-variations"}))
                gimp = subprocess.Popen(
                    ["chroot", str(gimp_root.path), *gimp_env(f"{inner}/profile"),
                     "gimp-console-3", "-i", "--batch-interpreter=python-fu-eval", "-b",
                     f"JOB='{inner}/job.json'; exec(open('{inner}/e2e_cancel.py').read())",
                     "--quit"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    stdin=subprocess.DEVNULL)
                try:
                    eventually_sync(lambda: fake.running is not None,
                                    "the plug-in's request running on ComfyUI", 120)
                    [pid] = plugin_pids(inner)
                    t0 = time.monotonic()
                    os.kill(pid, signal.SIGKILL)  # what GIMP's progress Cancel does
                    out, err = gimp.communicate(timeout=GIMP_TIMEOUT)
                finally:
                    stop_process(gimp)
                [prompt_id] = fake.prompts
                # The gateway saw the client leave and cancelled the ComfyUI job.
                eventually_sync(lambda: fake.job_cancels == [prompt_id] or fake.interrupts,
                                "ComfyUI's job cancel (or interrupt) call", 60)
                print(f"plug-in killed -> ComfyUI job cancelled in "
                      f"{time.monotonic() - t0:.2f} s")
                assert fake.running is None
                # Audited as the client's disconnect, with nothing charged ...
                [(rid, status, charged)] = eventually_sync(
                    lambda: audit_rows(tmp_path / "audit.sqlite3"), "the audit record", 60)
                assert (status, charged) == (499, 0), (rid, status, charged)
                # ... and the member's usage is untouched.
                assert used_today(gw.url) == 0
        res = json.loads((host / "out" / "cancel.json").read_text())
    finally:
        shutil.rmtree(host, ignore_errors=True)
    assert res["status"] != "success", res
    assert res["after"] == res["before"] == [["Dusk", False]], (res, out[-2000:], err[-3000:])
