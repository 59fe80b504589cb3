"""``audit.dsn`` (gateway/config/dsn.py): a password with ``/``, ``#``, ``?`` or ``@``
substituted from ``${ENV}`` never shows in check-config, a log line or ``/readyz``.

Before the fix such a password moved the URL's boundaries, check-config printed it, and
asyncpg's ``ValueError: invalid literal for int() with base 10: 'Sekr'`` went into
``audit_ship_failed`` and into ``/readyz``'s ``checks.audit.shipping``."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from support import ADMIN_TOKEN, base_config, eventually, free_port

from gateway.app import build_app
from gateway.config import ConfigError, build_config, dsn
from gateway.config.display import dump_config

SPECIALS = ["/", "#", "?", "@"]
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def password(char: str) -> str:
    return f"Sekr{char}etX9"


def pieces(char: str) -> list[str]:
    """The password and what a parser split it into: none may show anywhere."""
    return [password(char), "Sekr", "etX9"]


def url(pw: str, port: int = 5432) -> str:
    return f"postgresql://gateway:{pw}@127.0.0.1:{port}/vg"


def assert_hidden(text: str, char: str) -> None:
    for piece in pieces(char):
        assert piece not in text, text


@pytest.mark.parametrize("char", SPECIALS)
def test_a_password_needing_percent_encoding_is_refused_without_quoting_it(
        tmp_path: Path, char: str) -> None:
    raw = base_config(tmp_path, audit={"kind": "postgres", "dsn": url(password(char))})
    with pytest.raises(ConfigError) as err:
        build_config(raw)
    assert err.value.path == "audit.dsn"
    assert "percent-encode" in str(err.value) and "PGPASSWORD" in str(err.value)
    assert_hidden(str(err.value), char)


@pytest.mark.parametrize("char", SPECIALS)
def test_a_percent_encoded_password_loads_and_is_masked(tmp_path: Path, char: str) -> None:
    encoded = password(char).replace(char, f"%{ord(char):02X}")
    cfg = build_config(base_config(tmp_path, audit={"kind": "postgres", "dsn": url(encoded)}))
    shown = dump_config(cfg)
    assert "gateway:***@127.0.0.1:5432/vg" in shown
    assert_hidden(shown, char)


@pytest.mark.parametrize("char", SPECIALS)
def test_check_config_masks_a_url_that_does_not_parse(tmp_path: Path, char: str) -> None:
    cfg = build_config(base_config(tmp_path))
    broken = dataclasses.replace(cfg, audit=dataclasses.replace(
        cfg.audit, kind="postgres", dsn=url(password(char))))
    shown = dump_config(broken)
    assert "gateway:***@127.0.0.1:5432/vg" in shown
    assert_hidden(shown, char)


@pytest.mark.parametrize("char", SPECIALS)
def test_check_config_from_env_never_prints_the_password(tmp_path: Path, char: str) -> None:
    raw = base_config(tmp_path, audit={
        "kind": "postgres", "dsn": "postgresql://gateway:${AUDIT_DB_PASSWORD}@db:5432/vg"})
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(path)],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "AUDIT_DB_PASSWORD": password(char)})
    assert out.returncode != 0
    assert "audit.dsn" in out.stderr and "percent-encode" in out.stderr
    assert_hidden(out.stdout + out.stderr, char)


def test_key_value_dsn_parses_and_becomes_a_url_asyncpg_takes() -> None:
    text = r"host=db port=5433 user=gateway password='a b/c#d?e@f\'g' dbname=vg sslmode=disable"
    assert dsn.problem(text) is None
    assert dsn.to_url(text) == ("postgresql://gateway:a%20b%2Fc%23d%3Fe%40f%27g@db:5433/vg"
                                "?sslmode=disable")
    assert "a b/c#d?e@f" not in dsn.mask(text)
    assert dsn.problem("host=db password=it's") is not None  # an unquoted '
    assert dsn.problem("host=db connect_timeout=3") is not None  # asyncpg: no such key
    # An unquoted password with a space: its second half reads as a key; never shown.
    said = dsn.problem("host=db password=hunter2 Zebra9=xyz")
    assert said is not None and "single quotes" in said
    assert "Zebra9" not in said and "hunter2" not in said and "xyz" not in said


@pytest.mark.parametrize("char", SPECIALS)
async def test_a_broken_dsn_leaks_into_no_log_line_and_not_readyz(
        aiohttp_client: Any, tmp_path: Path, char: str) -> None:
    """A DSN that got past the check (an older config): the driver's message, which
    quotes pieces of the password, stays out of the logs, /readyz and the answers."""
    cfg = build_config(base_config(tmp_path, audit={"kind": "postgres",
                                                    "dsn": url("x", free_port())}))
    cfg = dataclasses.replace(cfg, audit=dataclasses.replace(
        cfg.audit, dsn=url(password(char), free_port())))
    with structlog.testing.capture_logs() as logs:
        client = await aiohttp_client(build_app(cfg))
        async with client.post("/v1/images/variations", data={"n": "1"}) as r:
            assert r.status == 401  # audited: the shipper has a row to ship

        async def failing() -> Any:
            async with client.get("/readyz") as r:
                body = await r.json()
            shipping = body["checks"]["audit"]["shipping"]
            return body if shipping != "ok" else None

        ready = await eventually(failing, "the shipper reports its failure")
        async with client.get("/admin/audit", headers=ADMIN) as r:
            assert r.status == 503
            answered = await r.text()
        async with client.get("/admin/usage", headers=ADMIN) as r:
            assert r.status == 200  # PostgreSQL away: the ledger's figures
            usage = await r.json()
    assert usage["source"] == "ledger" and "alice" in usage["users"]
    assert ready["checks"]["audit"]["shipping"].startswith("retrying: ")
    assert_hidden(json.dumps(ready), char)
    assert_hidden(answered, char)
    failures = [e for e in logs if e["event"] in ("audit_ship_failed", "audit_read_failed")]
    assert {e["event"] for e in failures} == {"audit_ship_failed", "audit_read_failed"}
    assert_hidden(json.dumps(logs, default=str), char)
