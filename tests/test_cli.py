"""The ``variations-gateway`` command line, run as a real subprocess."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import urllib.request
from pathlib import Path

from PIL import Image
from support import TOKENS, free_port, png_bytes

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


def test_check_config_masks_secrets(tmp_path: Path) -> None:
    cfg = tmp_path / "g.yaml"
    cfg.write_text("auth: {mode: none}\nimages: {signing_key: topsecretvalue}\n")
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
