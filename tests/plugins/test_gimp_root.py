"""tests/plugins/gimp/build_root.sh without building anything: which Debian mirror it takes
(the machine's own apt sources, never a host named in the repository) and which suites it
builds. The builds themselves run in test_gimp_e2e.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
BUILD_ROOT = HERE / "gimp" / "build_root.sh"
REPO = HERE.parents[1]


def mirror(apt_etc: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "VG_DEBIAN_MIRROR"}
    return subprocess.run(["bash", str(BUILD_ROOT), "--mirror"], capture_output=True,
                          text=True, timeout=30, env={**base, "VG_APT_ETC": str(apt_etc), **env})


def test_mirror_comes_from_the_deb822_sources(tmp_path: Path) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    # Debian 12's own layout (debian.sources), security stanza first here on purpose, a
    # disabled stanza and a deb-src one before the archive we want.
    (d / "debian.sources").write_text(
        "Types: deb\n"
        "# http://snapshot.example/archive/debian-security/20250520T000000Z\n"
        "URIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://disabled.example/debian\nSuites: bookworm\n"
        "Components: main\nEnabled: no\n\n"
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n"
        "Components: main\n\n"
        "Types: deb\n"
        "URIs: http://mirror.example/debian http://second.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    (tmp_path / "sources.list").write_text("deb http://oneline.example/debian bookworm main\n")
    r = mirror(tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "http://mirror.example/debian"


def test_mirror_comes_from_the_one_line_sources_list(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb http://security.example/debian-security bookworm-security main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://oneline.example/debian bookworm main\n")
    r = mirror(tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "http://oneline.example/debian"


def test_no_mirror_is_a_sentence_and_the_override_wins(tmp_path: Path) -> None:
    r = mirror(tmp_path)
    assert r.returncode == 2
    assert "no Debian mirror in" in r.stderr and "VG_DEBIAN_MIRROR" in r.stderr
    r = mirror(tmp_path, VG_DEBIAN_MIRROR="http://override.example/debian")
    assert r.stdout.strip() == "http://override.example/debian"


def test_no_debian_host_is_named_by_the_root_builders() -> None:
    """The root builders and the scripts that call them take the mirror from the machine."""
    for path in (BUILD_ROOT, REPO / "scripts" / "gimp-screenshot.sh",
                 HERE / "test_gimp_e2e.py"):
        text = path.read_text()
        assert "debian.org" not in text, path


@pytest.mark.parametrize("suite", ["bookworm", "3.0", "../etc"])
def test_only_suites_with_gimp_3_are_built(suite: str, tmp_path: Path) -> None:
    r = subprocess.run(["bash", str(BUILD_ROOT), suite], capture_output=True, text=True,
                       timeout=30, env={**os.environ, "VG_GIMP_CACHE": str(tmp_path)})
    assert r.returncode == 2
    assert f"unknown suite '{suite}'" in r.stderr
    assert not list(tmp_path.iterdir())
