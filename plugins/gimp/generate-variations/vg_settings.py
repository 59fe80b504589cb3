"""Where Generate Variations finds the gateway URL and the user's token.

Not procedure arguments on purpose: GIMP stores the last values of every argument in its
profile and, for image procedures, inside every saved .xcf. The URL, token, timeout and
CA file live in the environment (``VARIATIONS_GATEWAY_URL``, ``VARIATIONS_GATEWAY_TOKEN``,
``VARIATIONS_GATEWAY_TIMEOUT``, ``VARIATIONS_GATEWAY_CA_FILE``), else in a JSON file in
GIMP's user config folder, written with mode 0600. The environment wins over the file, key
by key.

Standard library only, importable without GIMP.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

FILE_NAME = "generate-variations.json"
DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT = 180.0
ENV_URL = "VARIATIONS_GATEWAY_URL"
ENV_TOKEN = "VARIATIONS_GATEWAY_TOKEN"
ENV_TIMEOUT = "VARIATIONS_GATEWAY_TIMEOUT"
# A PEM file of the studio's CA, trusted besides the OS trust store, for an https gateway
# with a private certificate (so nobody falls back to http://, token in the clear).
ENV_CA_FILE = "VARIATIONS_GATEWAY_CA_FILE"
KEYS = ("url", "token", "timeout", "ca_file")


class SettingsError(ValueError):
    """A settings file that cannot be read or written; the message is for the user."""


@dataclass
class Settings:
    url: str = DEFAULT_URL
    token: str = ""
    timeout: float = DEFAULT_TIMEOUT
    ca_file: str = ""
    # Which keys come from the environment (and so cannot be changed in the dialog).
    from_env: set[str] = field(default_factory=set)
    path: str = ""

    def masked_token(self) -> str:
        return mask(self.token)


def mask(token: str) -> str:
    """A token shown safely: its first 3 and last 4 characters."""
    if not token:
        return "(none)"
    if len(token) <= 10:
        return "*" * len(token)
    return f"{token[:3]}...{token[-4:]}"


def settings_path(config_dir: str) -> str:
    return os.path.join(config_dir, FILE_NAME)


def _timeout(value: object, where: str) -> float:
    try:
        t = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SettingsError(f"The timeout in {where} is not a number: {value!r}.") from None
    if not 1 <= t <= 3600:
        raise SettingsError(f"The timeout in {where} must be between 1 and 3600 seconds.")
    return t


def load(config_dir: str, environ: Mapping[str, str] | None = None) -> Settings:
    """The settings in force: the file in ``config_dir``, overridden by the environment."""
    env = os.environ if environ is None else environ
    path = settings_path(config_dir)
    s = Settings(path=path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        data = {}
    except (OSError, ValueError) as e:
        raise SettingsError(
            f"Could not read the Generate Variations settings file {path} ({e}); fix or "
            "delete it, then set the gateway again in Filters > Generate Variations Settings."
        ) from None
    if not isinstance(data, dict):
        raise SettingsError(f"The settings file {path} does not hold a JSON object.")
    if isinstance(data.get("url"), str) and data["url"].strip():
        s.url = data["url"].strip()
    if isinstance(data.get("token"), str):
        s.token = data["token"].strip()
    if data.get("timeout") is not None:
        s.timeout = _timeout(data["timeout"], path)
    if isinstance(data.get("ca_file"), str):
        s.ca_file = data["ca_file"].strip()
    if env.get(ENV_URL, "").strip():
        s.url = env[ENV_URL].strip()
        s.from_env.add("url")
    if env.get(ENV_TOKEN, "").strip():
        s.token = env[ENV_TOKEN].strip()
        s.from_env.add("token")
    if env.get(ENV_TIMEOUT, "").strip():
        s.timeout = _timeout(env[ENV_TIMEOUT], ENV_TIMEOUT)
        s.from_env.add("timeout")
    if env.get(ENV_CA_FILE, "").strip():
        s.ca_file = env[ENV_CA_FILE].strip()
        s.from_env.add("ca_file")
    return s


def _file_values(path: str) -> dict[str, object]:
    """What the settings file holds now (nothing when it is missing or unreadable)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save(
    config_dir: str,
    url: str,
    token: str,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    ca_file: str = "",
    from_env: Collection[str] = (),
) -> str:
    """Write the settings file with mode 0600 (atomically); returns its path.

    An empty ``ca_file`` is left out of the file (the OS trust store alone is used).
    Keys named in ``from_env`` (``"url"``, ``"token"``, ``"timeout"``, ``"ca_file"``: those
    whose value in force comes from an environment variable, as :attr:`Settings.from_env`
    says) are never taken from the arguments, which the dialog fills with the values in
    force: the file keeps what it held for them, or goes without them. So a token given in
    ``VARIATIONS_GATEWAY_TOKEN`` never lands on disk.
    """
    path = settings_path(config_dir)
    given: dict[str, object] = {"url": url.strip(), "token": token.strip(),
                                "ca_file": ca_file.strip()}
    if "timeout" not in from_env:
        given["timeout"] = _timeout(timeout, "the dialog")
    previous = _file_values(path) if from_env else {}
    data: dict[str, object] = {}
    for key in KEYS:
        if key not in from_env:
            if key != "ca_file" or given[key]:
                data[key] = given[key]
        elif key in previous:
            data[key] = previous[key]
    os.makedirs(config_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".generate-variations.", dir=config_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            # mkstemp creates the file 0600 already; chmod again in case of an odd FS.
            os.chmod(tmp, 0o600)
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
        os.chmod(path, 0o600)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise SettingsError(f"Could not write the settings file {path}: {e}.") from None
    return path
