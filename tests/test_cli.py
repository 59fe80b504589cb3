"""The ``variations-gateway`` command line, run as a real subprocess."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from PIL import Image
from support import (
    ROOT,
    TOKENS,
    base_config,
    eventually_sync,
    free_port,
    png_bytes,
    stop_process,
    wait_http,
)

CLI = [sys.executable, "-m", "gateway"]


def run(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def test_add_user_prints_a_token_once_and_its_hash() -> None:
    out = run("add-user", "carol")
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    token = lines[1].strip()
    assert token.startswith("vg-") and len(token) >= 40
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert f"token_sha256: {digest}" in out.stdout
    assert out.stdout.count(token) == 1
    again = run("add-user", "carol")
    assert again.stdout.splitlines()[1].strip() != token  # fresh every time


def test_add_user_rejects_bad_names() -> None:
    assert run("add-user", "bad name!").returncode == 2
    out = run("add-user", "anonymous")  # reserved: the caller when auth is off
    assert out.returncode == 2 and "reserved" in out.stderr


def test_a_config_that_is_not_utf8_is_one_line_for_every_command(tmp_path: Path) -> None:
    """Review: only serve and reload read the file as bytes; check-config and healthcheck
    ended in a UnicodeDecodeError traceback (one reader for all now)."""
    cfg = tmp_path / "g.yaml"
    cfg.write_bytes("auth: {mode: none}\n# caf\u00e9\n".encode("latin-1"))
    for args in (("check-config", str(cfg)), ("healthcheck", "--config", str(cfg))):
        out = run(*args)
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
        assert "is not UTF-8 (byte" in out.stderr, out.stderr


def test_check_config_masks_secrets(tmp_path: Path) -> None:
    cfg = tmp_path / "g.yaml"
    cfg.write_text("auth: {mode: none}\n"
                   "images: {signing_key: topsecretvalue-0123456789abcdef0123}\n")
    out = run("check-config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "topsecretvalue" not in out.stdout and "signing_key: '***'" in out.stdout


def test_check_config_error_names_the_line(tmp_path: Path) -> None:
    cfg = tmp_path / "g.yaml"
    cfg.write_text("auth: {mode: none}\nquota_defaults:\n  images_per_day: lots\n")
    out = run("check-config", str(cfg))
    assert out.returncode != 0
    assert "line 3" in out.stderr and "quota_defaults.images_per_day" in out.stderr
    assert out.stderr.count("line 3") == 1, out.stderr  # not wrapped again by its parent


def test_serve_refuses_open_gateway_off_loopback(tmp_path: Path) -> None:
    cfg = tmp_path / "g.yaml"
    cfg.write_text("auth: {mode: none}\n")
    out = run("serve", "--config", str(cfg), "--host", "0.0.0.0", "--port", "0", cwd=tmp_path)
    assert out.returncode == 2
    assert "only allowed on a loopback address" in out.stderr


def test_a_second_gateway_on_the_same_sqlite_state_refuses_to_start(
        gateway_process, tmp_path: Path) -> None:
    """Two processes on one ledger would each keep their own mirror: quotas not exact."""
    first = gateway_process()
    out = run("serve", "--config", str(first.config_path), "--port", str(free_port()),
              cwd=tmp_path)
    assert out.returncode == 1
    assert f"in use by another gateway process (pid {first.proc.pid})" in out.stderr
    assert "state.kind: redis" in out.stderr
    assert "Traceback" not in out.stderr
    with urllib.request.urlopen(first.url + "/healthz", timeout=10) as r:
        assert r.status == 200  # the first one is untouched


def test_unusable_state_files_stop_serve_with_one_clear_line(tmp_path: Path) -> None:
    """A corrupt (or full, or locked) SQLite file: one line naming the files, no
    traceback for an admin to read through at 3 a.m."""
    (tmp_path / "audit.sqlite3").write_bytes(b"this is not a database" * 100)
    cfg = tmp_path / "g.yaml"
    cfg.write_text(f"auth: {{mode: none}}\naudit: {{path: {tmp_path / 'audit.sqlite3'}}}\n")
    out = run("serve", "--config", str(cfg), "--port", str(free_port()), cwd=tmp_path)
    assert out.returncode == 1
    assert "SQLite said" in out.stderr and "audit.sqlite3" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_state_dir_it_cannot_write_stops_serve_with_the_chown_to_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A root-owned host directory on the container's state volume: one line naming the
    directory and the chown, not ``Permission denied: 'var'`` from deep in start-up.
    (Tests run as root, which may write anywhere: the refusal of access is simulated
    here; tests/test_container.py meets the real one as uid 10001.)"""
    from gateway import cli, logs, state

    volume = tmp_path / "volume"
    volume.mkdir()
    cfg = tmp_path / "g.yaml"
    cfg.write_text(f"auth: {{mode: none}}\nstate: {{path: {volume}/state.sqlite3}}\n"
                   f"cache: {{dir: {volume}/cache}}\nimages: {{dir: {volume}/images}}\n"
                   f"audit: {{path: {volume}/audit.sqlite3}}\n")
    # serve in-process: logging stays as the tests have it (a structlog configured with
    # cached loggers here left later tests' capture_logs() empty).
    monkeypatch.setattr(logs, "configure", lambda *args: None)
    real_access = state.os.access
    monkeypatch.setattr(state.os, "access",
                        lambda p, mode: Path(p) != volume and real_access(p, mode))
    assert cli.main(["serve", "--config", str(cfg), "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{volume} is not writable by uid" in err and f"chown -R {os.getuid()} {volume}" in err
    assert f"podman unshare chown -R {os.getuid()} DIR, or mount it with :U" in err
    assert not (volume / "images").exists()


def test_vary_writes_pngs(gateway_process, tmp_path: Path) -> None:
    g = gateway_process()
    src = tmp_path / "layer.png"
    src.write_bytes(png_bytes(64))
    out = run("vary", str(src), "-n", "2", "--size", "256x256", "-o", str(tmp_path / "out"),
              "--url", g.url, "--token", TOKENS["alice"])
    assert out.returncode == 0, out.stderr
    files = sorted((tmp_path / "out").glob("layer-variation-*.png"))
    assert len(files) == 2
    assert all(Image.open(f).size == (256, 256) for f in files)
    assert "uploading" in out.stderr and "done: 2 image(s)" in out.stderr


def test_vary_reports_the_gateway_error(gateway_process, tmp_path: Path) -> None:
    g = gateway_process()
    src = tmp_path / "layer.png"
    src.write_bytes(png_bytes(64))
    out = run("vary", str(src), "--url", g.url, "--token", "wrong-token")
    assert out.returncode == 1
    assert "HTTP 401 [invalid_api_key]" in out.stderr
    assert "wrong-token" not in out.stderr


# ------------------------------------------------------------- issue 19: a new admin


MEMBER = "users:\n  carol: {token_sha256: " + "c" * 64 + "}\n"


def test_add_user_says_to_turn_token_auth_on() -> None:
    out = run("add-user", "carol")
    assert "auth: {mode: tokens}" in out.stdout


def test_add_user_admin_makes_the_admin_token(tmp_path: Path) -> None:
    out = run("add-user", "--admin")
    assert out.returncode == 0, out.stderr
    token = out.stdout.splitlines()[1].strip()
    assert token.startswith("vg-")
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert f"  admin_token_sha256: {digest}" in out.stdout and "  mode: tokens" in out.stdout
    cfg = tmp_path / "g.yaml"  # the snippet pasted as printed is a valid config
    snippet = out.stdout[out.stdout.index("auth:"):].split("\n\n")[0]
    cfg.write_text(snippet + "\n" + MEMBER)
    assert run("check-config", str(cfg)).returncode == 0
    assert run("add-user", "--admin", "carol").returncode == 2


def test_members_under_auth_none_stop_check_config_and_serve(tmp_path: Path) -> None:
    """add-user's snippet pasted with auth off used to leave every token welcome."""
    cfg = tmp_path / "g.yaml"
    cfg.write_text("auth: {mode: none}\n" + MEMBER)
    for out in (run("check-config", str(cfg)),
                run("serve", "--config", str(cfg), "--port", str(free_port()), cwd=tmp_path)):
        assert out.returncode == 2
        assert "auth.mode is none, so the 1 member(s) under users: would be ignored" in (
            out.stderr)
        assert "Set auth.mode: tokens" in out.stderr


def test_tokens_without_members_is_a_loud_warning(tmp_path: Path) -> None:
    cfg = tmp_path / "g.yaml"
    cfg.write_text("auth: {mode: tokens}\n")
    out = run("check-config", str(cfg))
    assert out.returncode == 0
    assert "WARNING: auth.mode is tokens but no member is configured" in out.stderr


def test_a_busy_port_names_the_setting_and_the_flag(tmp_path: Path) -> None:
    cfg = tmp_path / "g.yaml"
    cfg.write_text(f"auth: {{mode: tokens}}\nstate: {{path: {tmp_path / 's.sqlite3'}}}\n"
                   f"cache: {{dir: {tmp_path / 'c'}}}\nimages: {{dir: {tmp_path / 'i'}}}\n"
                   f"audit: {{path: {tmp_path / 'a.sqlite3'}}}\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run("serve", "--config", str(cfg), "--port", str(port), cwd=tmp_path)
    assert out.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in out.stderr
    assert "server.port in the config" in out.stderr
    assert f"serve --port {port + 1}" in out.stderr and f"make run PORT={port + 1}" in (
        out.stderr)
    assert "WARNING: auth.mode is tokens but no member" in out.stderr  # serve warns too
    assert "Traceback" not in out.stderr


def test_make_run_takes_a_port() -> None:
    if shutil.which("make") is None:
        pytest.skip("no make")
    out = subprocess.run(["make", "-n", "run", "PORT=8081", "HOST=0.0.0.0"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "serve --config config/gateway.yaml --port 8081 --host 0.0.0.0" in out.stdout


def test_serve_prints_where_its_files_live(gateway_process, tmp_path: Path) -> None:
    g = gateway_process()
    log = g.log()
    for name, path in (("state", "state.sqlite3"), ("cache", "cache"),
                       ("images", "images"), ("audit", "audit.sqlite3")):
        assert f"  {name}: {tmp_path / path}\n" in log, log


def test_vary_squares_non_png_input_and_never_overwrites(gateway_process,
                                                         tmp_path: Path) -> None:
    g = gateway_process()
    src = tmp_path / "photo.jpg"
    Image.open(io.BytesIO(png_bytes(64))).convert("RGB").resize((96, 64)).save(src, "JPEG")
    out_dir = tmp_path / "out"
    for _ in range(2):
        out = run("vary", str(src), "-n", "2", "--size", "256x256", "-o", str(out_dir),
                  "--url", g.url, "--token", TOKENS["alice"], "--fresh")
        assert out.returncode == 0, out.stderr
    assert "converted from JPEG to PNG; centre-cropped from 96x64 to 64x64" in out.stderr
    files = sorted(p.name for p in out_dir.glob("photo-variation-*.png"))
    assert files == [f"photo-variation-{k}.png" for k in (1, 2, 3, 4)]


def test_vary_pads_when_asked() -> None:
    from gateway.client import prepare_image

    wide = io.BytesIO()
    Image.new("RGB", (80, 40), "red").save(wide, "PNG")
    data, note = prepare_image(wide.getvalue(), "pad")
    padded = Image.open(io.BytesIO(data))
    assert padded.size == (80, 80) and padded.getpixel((0, 0))[3] == 0
    assert note == "padded from 80x40 to 80x80"
    square = png_bytes(32)
    assert prepare_image(square) == (square, None)  # a square PNG goes as it is


def _hup_ignored(pid: int) -> bool:
    """Whether ``pid`` ignores SIGHUP now (bit 0 of SigIgn in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(ln.split()[1] for ln in status.splitlines() if ln.startswith("SigIgn:"))
    return bool(int(mask, 16) & 1 << (signal.SIGHUP - 1))


def test_a_sighup_during_start_up_does_not_kill_serve(tmp_path: Path) -> None:
    """`systemctl reload` while the gateway starts (build_app may wait for Redis): the
    HUP used to end the process (exit 129, which Restart=on-failure does not restart).
    The HUP goes at the first moment the process can take one, long before the reload
    handler exists; without the fix that moment never comes and the poll fails."""
    cfg = tmp_path / "g.yaml"
    port = free_port()
    cfg.write_text(yaml.safe_dump(base_config(tmp_path, server={"port": port})))
    proc = subprocess.Popen([*CLI, "serve", "--config", str(cfg)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        eventually_sync(lambda: proc.poll() is not None or _hup_ignored(proc.pid),
                        "serve to stop SIGHUP from being fatal", 30, interval_s=0.001)
        proc.send_signal(signal.SIGHUP)
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        assert proc.poll() is None
    finally:
        stop_process(proc)
