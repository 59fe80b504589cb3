"""``variations-gateway install-gimp-plugin``: put the Generate Variations plug-in where
GIMP 3 looks for it.

GIMP 3 loads user plug-ins from ``<profile>/plug-ins/<name>/<name>.py`` (executable, the
folder named like the file). The profile is ``GIMP/3.<minor>`` under the user's config
folder: ``~/.config`` on Linux (``$XDG_CONFIG_HOME``), ``~/.var/app/org.gimp.GIMP/config``
for the Flatpak, ``~/Library/Application Support`` on macOS, ``%APPDATA%`` on Windows;
``$GIMP3_DIRECTORY`` replaces it when set. Every GIMP 3.x profile found gets a copy.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import stat
import sys
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

PLUGIN_NAME = "generate-variations"
MAIN_FILE = f"{PLUGIN_NAME}.py"
_VERSION_DIR = re.compile(r"^3\.\d+$")


def plugin_source() -> Path:
    """The plug-in folder: next to the package in a checkout (``pip install -e``), else
    shipped inside the package as ``gateway/gimp_plugin`` (package data)."""
    repo = Path(__file__).resolve().parents[1] / "plugins" / "gimp" / PLUGIN_NAME
    if (repo / MAIN_FILE).is_file():
        return repo
    packaged = Path(str(resources.files("gateway") / "gimp_plugin"))
    if (packaged / MAIN_FILE).is_file():
        return packaged
    raise FileNotFoundError(
        f"the plug-in files are missing: looked in {repo} and {packaged}")


def config_roots(platform: str, env: Mapping[str, str], home: Path) -> list[Path]:
    """Folders that hold ``GIMP/3.x`` profiles on ``platform`` (``sys.platform`` values)."""
    if platform.startswith("win"):
        appdata = env.get("APPDATA") or str(home / "AppData" / "Roaming")
        return [Path(appdata) / "GIMP"]
    if platform == "darwin":
        return [home / "Library" / "Application Support" / "GIMP"]
    xdg = env.get("XDG_CONFIG_HOME") or str(home / ".config")
    return [Path(xdg) / "GIMP", home / ".var" / "app" / "org.gimp.GIMP" / "config" / "GIMP"]


def _version_key(p: Path) -> tuple[int, int]:
    major, minor = p.name.split(".")
    return int(major), int(minor)


def find_profiles(platform: str, env: Mapping[str, str], home: Path) -> list[Path]:
    """Existing GIMP 3.x profile folders, newest version first within each root."""
    if env.get("GIMP3_DIRECTORY"):
        return [Path(env["GIMP3_DIRECTORY"])]
    found: list[Path] = []
    for root in config_roots(platform, env, home):
        if not root.is_dir():
            continue
        versions = [p for p in root.iterdir() if p.is_dir() and _VERSION_DIR.match(p.name)]
        found.extend(sorted(versions, key=_version_key, reverse=True))
    return found


def plugins_dir(gimp_dir: Path) -> Path:
    """``--gimp-dir`` may name the profile (``.../GIMP/3.0``) or its ``plug-ins`` folder."""
    return gimp_dir if gimp_dir.name == "plug-ins" else gimp_dir / "plug-ins"


def install_into(plugins: Path, source: Path | None = None) -> Path:
    """Copy the plug-in into ``plugins/generate-variations`` (replacing an older copy),
    with the run bit on the main file. Returns the folder written."""
    src = source or plugin_source()
    dest = plugins / PLUGIN_NAME
    plugins.mkdir(parents=True, exist_ok=True)
    tmp = plugins / f".{PLUGIN_NAME}.installing"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix == ".py":
            shutil.copyfile(f, tmp / f.name)
            mode = 0o755 if f.name == MAIN_FILE else 0o644
            os.chmod(tmp / f.name, mode)
    if not (tmp / MAIN_FILE).is_file():
        shutil.rmtree(tmp)
        raise FileNotFoundError(f"{src} holds no {MAIN_FILE}")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def uninstall_from(plugins: Path) -> Path | None:
    dest = plugins / PLUGIN_NAME
    if dest.exists():
        shutil.rmtree(dest)
        return dest
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gimp-dir", type=Path, action="append", default=None, metavar="DIR",
        help="GIMP 3 profile folder (e.g. ~/.config/GIMP/3.0) or its plug-ins folder; "
             "repeatable. Default: every GIMP 3.x profile found for this user.")
    parser.add_argument("--uninstall", action="store_true",
                        help="remove the plug-in instead of installing it")


def run(args: argparse.Namespace) -> int:
    return main(args.gimp_dir, args.uninstall, sys.platform, os.environ, Path.home())


def main(gimp_dirs: list[Path] | None, uninstall: bool, platform: str,
         env: Mapping[str, str], home: Path) -> int:
    profiles = list(gimp_dirs) if gimp_dirs else find_profiles(platform, env, home)
    if not profiles:
        roots = ", ".join(str(r) for r in config_roots(platform, env, home))
        print(
            "No GIMP 3 profile found (looked for GIMP/3.x in " + roots + "). Start GIMP 3 "
            "once so it creates its profile, or name the folder with --gimp-dir DIR "
            "(GIMP shows it in Edit > Preferences > Folders > Plug-ins).", file=sys.stderr)
        return 1
    status = 0
    for profile in profiles:
        plugins = plugins_dir(profile.expanduser())
        try:
            if uninstall:
                gone = uninstall_from(plugins)
                if gone:
                    print(f"Removed {gone}")
                else:
                    print(f"Not installed in {plugins}")
                continue
            dest = install_into(plugins)
        except OSError as e:
            print(f"Could not {'remove' if uninstall else 'install'} the plug-in in {plugins}: "
                  f"{e}", file=sys.stderr)
            status = 1
            continue
        mode = stat.S_IMODE((dest / MAIN_FILE).stat().st_mode)
        print(f"Installed Generate Variations into {dest} ({MAIN_FILE} mode {mode:o})")
    if not uninstall and status == 0:
        print("Restart GIMP, then use Filters > Generate Variations Settings... to set the "
              "gateway URL and your token, and Filters > Generate Variations... on a layer.")
    return status
