"""A canary upstream key must never leave the gateway towards clients, logs or audit.

One real gateway process with every HTTP backend configured with the same
``sk-canary-...`` key, at debug log level with the audit copied to stdout. The fakes
really receive the key and echo it in their error bodies (like a careless upstream),
so any pass-through of an upstream body, header or URL would carry it. Traffic covers
successes and faults; then every response body and header, the process's whole log and
every file the gateway wrote (audit, state, cache, images) are scanned.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
from pathlib import Path
from typing import Any

import aiohttp
from fakes_upstreams import FakeUpstream
from support import ADMIN_TOKEN, TOKENS, png_bytes
from upstream_cases import SD_USER, backend_entry, make_fake, serve_fake

CANARY = "sk-canary-" + secrets.token_hex(12)
KINDS = ("openai", "openai_edits", "sdwebui", "comfyui")
FAULTS = ("500", "auth", "content_policy", "bad_json", "429", "reset", "hang",
          "truncated_b64")


def leaks(blob: bytes | str) -> bool:
    """Does ``blob`` hold the canary, plainly or inside a basic-auth/base64 encoding?"""
    raw = blob if isinstance(blob, bytes) else blob.encode("utf-8", "replace")
    encoded = base64.b64encode(f"{SD_USER}:{CANARY}".encode())
    return CANARY.encode() in raw or encoded in raw or CANARY[3:].encode() in raw


def test_the_scanner_sees_what_the_fakes_echo() -> None:
    """The scan can fail: the fakes' raw error bodies do contain the key."""
    assert leaks(f'{{"error": {{"message": "boom (auth was Bearer {CANARY})"}}}}')
    assert leaks(b"Authorization: Basic " + base64.b64encode(f"{SD_USER}:{CANARY}".encode()))
    assert not leaks("sk-canary-someone-else")


async def test_canary_key_appears_nowhere(gateway_process: Any, tmp_path: Path) -> None:
    fakes: dict[str, FakeUpstream] = {}
    servers = []
    entries = []
    for kind in KINDS:
        fake = fakes[kind] = make_fake(kind, key=CANARY)
        server, url = await serve_fake(fake)
        servers.append(server)
        entries.append(backend_entry(kind, url, key=CANARY, name=kind))
    gateway = gateway_process(
        backends=entries, route=["openai"],
        logging={"level": "debug", "format": "json"},
        audit={"path": str(tmp_path / "audit.sqlite3"), "stdout": True})
    seen: list[bytes] = []

    async def call(session: aiohttp.ClientSession, method: str, path: str,
                   **kwargs: Any) -> int:
        async with session.request(method, gateway.url + path, **kwargs) as r:
            seen.append(await r.read())
            seen.append(repr(list(r.raw_headers)).encode())
            return r.status

    def form(model: str, fmt: str, seed: int) -> aiohttp.FormData:
        f = aiohttp.FormData()
        f.add_field("image", png_bytes(64, seed=seed), filename="l.png",
                    content_type="image/png")
        for key, value in (("model", model), ("n", "2"), ("size", "256x256"),
                           ("response_format", fmt), ("user", "artist-1")):
            f.add_field(key, value)
        return f

    statuses: dict[tuple[str, str], int] = {}
    headers = {"Authorization": f"Bearer {TOKENS['alice']}", "Cache-Control": "no-store"}
    try:
        async with aiohttp.ClientSession() as session:
            seed = 0
            for kind in KINDS:
                for fault in (None, *FAULTS):
                    fakes[kind].inject(fault)
                    seed += 1
                    fmt = "url" if seed % 2 else "b64_json"
                    statuses[kind, str(fault)] = await asyncio.wait_for(call(
                        session, "POST", "/v1/images/variations",
                        data=form(kind, fmt, seed), headers=headers), 30)
                fakes[kind].inject(None)
            for path in ("/readyz", "/metrics", "/v1/usage", "/healthz"):
                await call(session, "GET", path, headers=headers)
            await call(session, "GET", "/admin/audit?limit=1000",
                       headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    finally:
        for fake in fakes.values():
            fake.release()
        assert gateway.stop() == 0
        for server in servers:
            await server.close()

    # The traffic was real: successes, the documented fault statuses, and the key was
    # sent to every upstream and echoed back in their error bodies.
    for kind in KINDS:
        assert statuses[kind, "None"] == 200, statuses
        assert statuses[kind, "auth"] == 502 and statuses[kind, "hang"] == 504
        assert statuses[kind, "content_policy"] == 400
        assert any(leaks(repr(r.headers)) for r in fakes[kind].requests), kind

    assert not [b for b in seen if leaks(b)], "a response carried the upstream key"
    log = gateway.log()
    assert '"event": "backend_failed"' in log and "upstream_auth_error" in log
    assert not leaks(log), "the gateway's log carried the upstream key"
    written = files_written(tmp_path, {gateway.config_path, gateway.log_path})
    assert any(p.name.startswith("audit.sqlite3") for p in written)
    assert not [p for p, data in written.items() if leaks(data)], "a file carried the key"


def files_written(root: Path, skip: set[Path]) -> dict[Path, bytes]:
    """Every file under ``root`` but the config (which holds the key) and the log."""
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p not in skip}
