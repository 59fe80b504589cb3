"""The container installs from ``deploy/requirements.lock``: it must agree with
``pyproject.toml`` (every runtime dependency, redis and postgres extras included, pinned
to a version its specifier allows, with hashes), or the image would not be the project."""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from support import ROOT

LOCK = ROOT / "deploy" / "requirements.lock"
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([^ \\]+)")


def locked() -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) for every pin in the lock."""
    pins: dict[str, tuple[str, int]] = {}
    current = ""
    for line in LOCK.read_text().splitlines():
        m = PIN.match(line)
        if m:
            current = canonicalize_name(m.group(1))
            pins[current] = (m.group(2), 0)
        elif current and line.strip().startswith("--hash=sha256:"):
            version, hashes = pins[current]
            pins[current] = (version, hashes + 1)
    return pins


def runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in
            [*project["dependencies"], *project["optional-dependencies"]["redis"],
             *project["optional-dependencies"]["postgres"]]]


def disagreements(pins: dict[str, tuple[str, int]], wanted: list[Requirement]) -> list[str]:
    problems = []
    for req in wanted:
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req.name} is not in the lock")
        elif not req.specifier.contains(pins[name][0], prereleases=True):
            problems.append(f"{req.name}=={pins[name][0]} does not satisfy {req}")
        for extra_dep in ("hiredis",) if "hiredis" in req.extras else ():
            if extra_dep not in pins:
                problems.append(f"{extra_dep} ({req}) is not in the lock")
    problems += [f"{name} has no hash" for name, (_, n) in pins.items() if n == 0]
    return problems


def test_the_lock_agrees_with_pyproject() -> None:
    assert not disagreements(locked(), runtime_requirements()), (
        "deploy/requirements.lock disagrees with pyproject.toml: run `make lock`")


def test_a_disagreement_is_found() -> None:
    pins = locked()
    wanted = runtime_requirements()
    assert disagreements({k: v for k, v in pins.items() if k != "aiohttp"}, wanted)
    assert disagreements({**pins, "pillow": ("1.0", 3)}, wanted)
    assert disagreements({**pins, "pyyaml": (pins["pyyaml"][0], 0)}, wanted)
    assert disagreements(pins, [*wanted, Requirement("left-pad>=1")])


def test_the_lock_names_no_host_or_local_path() -> None:
    text = LOCK.read_text()
    assert "--index-url" not in text and "--find-links" not in text
    assert "http://" not in text and "https://" not in text
