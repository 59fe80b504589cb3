"""``variations-gateway install-gimp-plugin`` (gateway/gimp_install.py): finds GIMP 3.x
profiles on Linux, Flatpak, macOS and Windows layouts, copies the plug-in folder with the
run bit, prints where it went, uninstalls."""

from __future__ import annotations

import argparse
import os
import py_compile
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from support import build_wheel

from gateway import gimp_install

REPO = Path(__file__).resolve().parents[2]
PLUGIN_SRC = REPO / "plugins" / "gimp" / "generate-variations"


def run_cli(argv: list[str], env: dict[str, str], home: Path, platform: str = "linux",
            ) -> int:
    parser = argparse.ArgumentParser()
    gimp_install.add_arguments(parser)
    args = parser.parse_args(argv)
    return gimp_install.main(args.gimp_dir, args.uninstall, platform, env, home)


def assert_installed(dest: Path) -> None:
    main = dest / "generate-variations.py"
    assert main.is_file()
    assert stat.S_IMODE(main.stat().st_mode) == 0o755
    names = sorted(p.name for p in dest.iterdir())
    assert names == sorted(p.name for p in PLUGIN_SRC.glob("*.py"))
    assert "__pycache__" not in names
    for p in PLUGIN_SRC.glob("*.py"):
        assert (dest / p.name).read_bytes() == p.read_bytes()


def test_plugin_source_is_the_repo_folder() -> None:
    assert gimp_install.plugin_source() == PLUGIN_SRC


@pytest.mark.parametrize(
    ("platform", "profile_rel", "env_key"),
    [
        ("linux", ".config/GIMP/3.0", None),
        ("linux", ".var/app/org.gimp.GIMP/config/GIMP/3.0", None),
        ("darwin", "Library/Application Support/GIMP/3.0", None),
        ("win32", "AppData/Roaming/GIMP/3.0", "APPDATA"),
    ],
)
def test_install_finds_the_profile_of_each_os(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], platform: str, profile_rel: str,
    env_key: str | None,
) -> None:
    home = tmp_path / "home"
    profile = home / profile_rel
    profile.mkdir(parents=True)
    env = {env_key: str(home / "AppData" / "Roaming")} if env_key else {}
    assert run_cli([], env, home, platform) == 0
    dest = profile / "plug-ins" / "generate-variations"
    assert_installed(dest)
    out = capsys.readouterr().out
    assert f"Installed Generate Variations into {dest}" in out
    assert "Filters > Generate Variations Settings" in out
    # --uninstall removes it again and says so.
    assert run_cli(["--uninstall"], env, home, platform) == 0
    assert not dest.exists()
    assert f"Removed {dest}" in capsys.readouterr().out


def test_every_gimp3_profile_gets_a_copy_not_gimp2(tmp_path: Path) -> None:
    home = tmp_path
    for v in ("2.10", "3.0", "3.2"):
        (home / ".config" / "GIMP" / v).mkdir(parents=True)
    xdg = tmp_path / "xdg"
    (xdg / "GIMP" / "3.0").mkdir(parents=True)
    # XDG_CONFIG_HOME replaces ~/.config.
    assert run_cli([], {"XDG_CONFIG_HOME": str(xdg)}, home) == 0
    assert_installed(xdg / "GIMP" / "3.0" / "plug-ins" / "generate-variations")
    assert not (home / ".config" / "GIMP" / "3.0" / "plug-ins").exists()
    assert run_cli([], {}, home) == 0
    for v in ("3.0", "3.2"):
        assert_installed(home / ".config" / "GIMP" / v / "plug-ins" / "generate-variations")
    assert not (home / ".config" / "GIMP" / "2.10" / "plug-ins").exists()


def test_gimp3_directory_env_wins(tmp_path: Path) -> None:
    (tmp_path / ".config" / "GIMP" / "3.0").mkdir(parents=True)
    custom = tmp_path / "custom-profile"
    assert run_cli([], {"GIMP3_DIRECTORY": str(custom)}, tmp_path) == 0
    assert_installed(custom / "plug-ins" / "generate-variations")
    assert not (tmp_path / ".config" / "GIMP" / "3.0" / "plug-ins").exists()


def test_gimp_dir_accepts_profile_or_plugins_folder_and_replaces_old_copies(
    tmp_path: Path,
) -> None:
    plugins = tmp_path / "p" / "plug-ins"
    stale = plugins / "generate-variations"
    stale.mkdir(parents=True)
    (stale / "old-module.py").write_text("# from an older version\n")
    assert run_cli(["--gimp-dir", str(plugins)], {}, tmp_path) == 0
    assert_installed(stale)
    assert not (stale / "old-module.py").exists()
    assert not list(plugins.glob(".*"))  # no leftovers of the atomic swap
    assert run_cli(["--gimp-dir", str(tmp_path / "q")], {}, tmp_path) == 0
    assert_installed(tmp_path / "q" / "plug-ins" / "generate-variations")


def test_no_profile_is_an_error_that_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli([], {}, tmp_path) == 1
    err = capsys.readouterr().err
    assert "No GIMP 3 profile found" in err
    assert "--gimp-dir" in err
    assert not (tmp_path / ".config").exists()  # never invents a profile


def test_uninstall_when_absent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["--gimp-dir", str(tmp_path), "--uninstall"], {}, tmp_path) == 0
    assert "Not installed in" in capsys.readouterr().out


def test_run_uses_the_real_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIMP3_DIRECTORY", str(tmp_path / "prof"))
    parser = argparse.ArgumentParser()
    gimp_install.add_arguments(parser)
    assert gimp_install.run(parser.parse_args([])) == 0
    assert_installed(tmp_path / "prof" / "plug-ins" / "generate-variations")


def test_installed_plugin_compiles_and_its_modules_import_without_gimp(tmp_path: Path) -> None:
    dest = gimp_install.install_into(tmp_path / "plug-ins")
    for f in dest.glob("*.py"):
        py_compile.compile(str(f), cfile=str(tmp_path / (f.name + "c")), doraise=True)
    # -S: no site-packages, so the modules need nothing beyond the standard library.
    code = (f"import sys; sys.path.insert(0, {str(dest)!r}); "
            "import vg_client, vg_prepare, vg_settings; print('ok')")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], cwd=dest, capture_output=True,
                         text=True, timeout=60, env={"PATH": os.environ.get("PATH", "")})
    assert out.stdout.strip() == "ok", out.stderr
    first = (dest / "generate-variations.py").read_text().splitlines()[0]
    assert first == "#!/usr/bin/env python3"


def test_cli_subcommand_installs_and_uninstalls(tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("GIMP3_DIRECTORY", None)
    env.pop("XDG_CONFIG_HOME", None)
    cmd = [sys.executable, "-m", "gateway", "install-gimp-plugin", "--gimp-dir",
           str(tmp_path / "prof")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr
    dest = tmp_path / "prof" / "plug-ins" / "generate-variations"
    assert f"Installed Generate Variations into {dest}" in out.stdout
    assert_installed(dest)
    out = subprocess.run([*cmd, "--uninstall"], capture_output=True, text=True, timeout=120,
                         cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr
    assert not dest.exists()
    # No profile anywhere under this HOME: exit 1 with advice.
    out = subprocess.run([sys.executable, "-m", "gateway", "install-gimp-plugin"],
                         capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert out.returncode == 1
    assert "No GIMP 3 profile found" in out.stderr


def test_a_built_wheel_ships_the_plugin(tmp_path: Path) -> None:
    """``pip install .`` (the container image, pipx) has no checkout beside the package:
    the wheel itself must carry the plug-in, and the installer must find it there."""
    wheel = build_wheel(["pyproject.toml", "README.md", "gateway", "plugins"], tmp_path)
    site = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check",
                          "--quiet", "install", "--no-deps", "--target", str(site), str(wheel)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = "import gateway.gimp_install as g; print(g.__file__); print(g.plugin_source())"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    module, source = out.stdout.split()
    assert Path(module).is_relative_to(site), "the checkout's package was imported"
    assert Path(source) == site / "gateway" / "gimp_plugin"
    out = subprocess.run([sys.executable, "-m", "gateway", "install-gimp-plugin",
                          "--gimp-dir", str(tmp_path / "prof")], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert_installed(tmp_path / "prof" / "plug-ins" / "generate-variations")
