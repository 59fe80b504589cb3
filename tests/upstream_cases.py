"""The acceptance matrix every upstream backend runs: the SDK at every size, format and
n in (1, 10); and every fault, with the documented client status, the retry count the
policy allows, readiness kept and nothing charged.

Each tests/backends/test_<kind>.py supplies the fake and its request-shape checks.
"""

from __future__ import annotations

import asyncio
import base64
import io
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer
from fakes_upstreams import (
    ComfyUIFake,
    FakeUpstream,
    OpenAIEditsFake,
    OpenAIVariationsFake,
    Recorded,
    SdWebUIFake,
    XinferenceFake,
)
from instrumented_backend import Answer, usage, vary
from PIL import Image
from support import ROOT, TOKENS, free_port, png_bytes

from gateway.keys import METRICS

KEY = "sk-test-upstream-" + secrets.token_hex(8)
SD_USER = "artist"
WORKFLOW = str(ROOT / "config" / "comfyui-workflow.json")
NAME = "up"
XINFERENCE_MODEL = "sd-img2img-7f3a"  # a launched model's UID
# Options for ``kind: openai`` against OpenAIVariationsFake: another instance of this
# gateway, which takes dall-e-2 and refuses fields beyond OpenAI's contract.
GATEWAY_UPSTREAM: dict[str, Any] = {"model": "dall-e-2", "prompt": None,
                                     "send_controls": "none"}
# Fast figures so the fault matrix runs in seconds; the policy is the same.
FAST: dict[str, Any] = {
    "timeout_seconds": 1.0, "connect_timeout_seconds": 0.5,
    "retry": {"max_attempts": 3, "backoff_initial_seconds": 0.01,
              "backoff_max_seconds": 0.05, "retry_after_cap_seconds": 5.0},
    "breaker": {"failure_threshold": 50, "cooldown_seconds": 30.0},
}
HANG_GUARD_S = 20.0
# The SDK matrix asks for ten real-sized (photo-like) images at 1024 px: give the calls
# room, where the fault tests keep FAST's 1 s deadline.
MATRIX: dict[str, Any] = {"timeout_seconds": 60.0}


def make_fake(kind: str, key: str = KEY) -> FakeUpstream:
    if kind == "openai":  # the maintained variations server most teams run
        return XinferenceFake(key, models=(XINFERENCE_MODEL,))
    if kind == "openai_edits":
        return OpenAIEditsFake(key)
    if kind == "sdwebui":
        return SdWebUIFake((SD_USER, key))
    if kind == "comfyui":
        return ComfyUIFake(key)
    raise ValueError(kind)


def backend_entry(kind: str, url: str, key: str = KEY, name: str = NAME, **extra: Any
                  ) -> dict[str, Any]:
    """A ``backends[]`` entry for ``kind`` at ``url`` (the fake's origin)."""
    entry: dict[str, Any] = {"name": name, "kind": kind, **FAST}
    if kind == "openai":
        entry.update(base_url=url + "/v1", api_key=key, model=XINFERENCE_MODEL)
    elif kind == "openai_edits":
        entry.update(base_url=url + "/v1", api_key=key)
    elif kind == "sdwebui":
        entry.update(base_url=url, username=SD_USER, password=key)
    else:
        entry.update(base_url=url, workflow=WORKFLOW, api_key=key, poll_interval_seconds=0.01)
    entry.update(extra)
    return entry


@dataclass
class Upstream:
    client: TestClient
    fake: FakeUpstream
    url: str

    def metric(self, name: str, **labels: str) -> float:
        value = self.client.app[METRICS].registry.get_sample_value(
            f"variations_gateway_{name}", {"backend": NAME, **labels})
        return value or 0.0


async def serve_fake(fake: FakeUpstream) -> tuple[TestServer, str]:
    server = TestServer(fake.app, host="127.0.0.1")
    await server.start_server()
    return server, str(server.make_url("")).rstrip("/")


@pytest.fixture
async def held_upstream() -> AsyncIterator[tuple[OpenAIVariationsFake, str]]:
    """A strict OpenAI variations upstream whose calls all wait until ``fake.release()``:
    requests held in flight (shutdown drains them, a reload must not drop them)."""
    fake = OpenAIVariationsFake(KEY)
    fake.gate.clear()  # every call waits at the upstream until the test opens the gate
    server, url = await serve_fake(fake)
    yield fake, url
    fake.release()
    await server.close()


async def start_upstream(gateway_client: Callable[..., Awaitable[TestClient]], kind: str,
                         fake: FakeUpstream | None = None, refuse: bool = False,
                         **backend: Any) -> tuple[Upstream, TestServer]:
    """A fake of ``kind`` and an in-process gateway routed to it (``refuse``: a port
    nobody listens on)."""
    fake = fake or make_fake(kind)
    server, url = await serve_fake(fake)
    target = f"http://127.0.0.1:{free_port()}" if refuse else url
    client = await gateway_client(backends=[backend_entry(kind, target, **backend)],
                                  route=[NAME])
    return Upstream(client, fake, url), server


# --------------------------------------------------------------------------- success


Check = Callable[[list[Recorded], int, int], None]


async def sdk_matrix(up: Upstream, check: Check) -> None:
    """The SDK gets ``n`` distinct PNGs of the asked size, as URLs and as base64, and
    ``check(new_upstream_calls, n, size)`` asserts the request shapes."""
    sdk = openai.AsyncOpenAI(base_url=str(up.client.make_url("/v1")),
                             api_key=TOKENS["alice"], max_retries=0)
    seed = 0
    for size in (256, 512, 1024):
        for fmt in ("url", "b64_json"):
            for n in (1, 10):
                before = len(up.fake.calls())
                seed += 1
                resp = await sdk.images.create_variation(
                    image=("layer.png", png_bytes(64, seed=seed), "image/png"), n=n,
                    size=f"{size}x{size}", response_format=fmt, user="artist-7")  # type: ignore[arg-type]
                assert len(resp.data) == n
                pixels = set()
                for item in resp.data:
                    if fmt == "url":
                        assert item.b64_json is None and item.url
                        async with up.client.session.get(item.url) as r:
                            assert r.status == 200
                            body = await r.read()
                    else:
                        assert item.url is None and item.b64_json
                        body = base64.b64decode(item.b64_json)
                    img = Image.open(io.BytesIO(body))
                    assert img.format == "PNG" and img.size == (size, size)
                    pixels.add(img.convert("RGB").tobytes())
                assert len(pixels) == n, "every variation must differ"
                check(up.fake.calls()[before:], n, size)
    await sdk.close()


def assert_hashed_user(value: str | None) -> None:
    """Upstream sees the gateway's HMAC of the end user, never the raw id."""
    assert value is not None and value.startswith("vgu-") and "artist-7" not in value


# --------------------------------------------------------------------------- faults

# fault -> (client status, error code or None for success, upstream calls at main path)
FAULTS: dict[str, tuple[int, str | None, int]] = {
    "refuse": (502, "upstream_unavailable", 0),
    "hang": (504, "upstream_timeout", 1),
    "reset": (502, "upstream_error", 3),
    "500": (502, "upstream_error", 3),
    "503": (503, "upstream_unavailable", 2),
    "429": (503, "upstream_rate_limited", 3),
    "bad_json": (502, "upstream_bad_response", 1),
    "deep_json": (502, "upstream_bad_response", 1),
    "deep_error": (502, "upstream_rejected", 1),
    "truncated_b64": (502, "upstream_bad_response", 1),
    "not_png": (502, "upstream_bad_response", 1),
    "corrupt_idat": (502, "upstream_bad_response", 1),
    "wrong_size": (200, None, 1),
    "trailing_bytes": (200, None, 1),  # junk after IEND is not part of the image
    "auth": (502, "upstream_auth_error", 1),
    "content_policy": (400, "content_policy_violation", 1),
}
FAULT_NAMES = tuple(FAULTS)
# Kinds of error each fault is counted as, per failed attempt.
ERROR_KIND = {"refuse": "connect", "hang": "timeout", "reset": "disconnected",
              "500": "http_5xx", "503": "http_503", "429": "http_429",
              "bad_json": "bad_response", "deep_json": "bad_response",
              "deep_error": "http_4xx", "truncated_b64": "bad_response",
              "not_png": "bad_response", "corrupt_idat": "bad_response", "auth": "auth",
              "content_policy": "content_policy"}


def fault_backend(fault: str) -> dict[str, Any]:
    """Backend overrides for a fault: the 503 case needs room for one 1 s retry-after."""
    if fault == "503":
        return {"timeout_seconds": 4.0, "retry": {**FAST["retry"], "max_attempts": 2}}
    return {}


async def run_fault(gateway_client: Callable[..., Awaitable[TestClient]], kind: str,
                    fault: str, fake: FakeUpstream | None = None, **backend: Any) -> Answer:
    """One fault end to end; returns the client's answer after the common assertions.
    ``fake`` and ``backend``: another fake of ``kind`` and its backend options."""
    up, server = await start_upstream(gateway_client, kind, fake=fake,
                                      refuse=fault == "refuse",
                                      **{**backend, **fault_backend(fault)})
    try:
        if fault != "refuse":
            up.fake.inject(fault)
        answer = await asyncio.wait_for(
            vary(up.client, png_bytes(64, seed=7), n=2, size="256x256"), HANG_GUARD_S)
        status, code, calls = FAULTS[fault]
        assert answer.status == status, answer.body
        raw = repr(answer.body) + repr(dict(answer.headers))
        assert KEY not in raw and up.url not in raw and "127.0.0.1" not in raw
        if code is None:
            for item in answer.body["data"]:
                img = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
                assert img.format == "PNG" and img.size == (256, 256)
        else:
            assert set(answer.body["error"]) == {"message", "type", "param", "code"}
            assert answer.body["error"]["code"] == code
            attempts = calls or FAULTS["reset"][2]
            assert up.metric("backend_errors_total", kind=ERROR_KIND[fault]) == attempts
        if fault != "refuse":
            assert len(up.fake.calls()) == calls
        assert up.metric("backend_retries_total") == max(0, (calls or 3) - 1)
        if fault == "503":
            assert answer.headers["retry-after"] == "1"
        if status >= 500 and fault != "503":
            assert "retry-after" not in answer.headers
        # The gateway stays ready, and a failure costs the member nothing.
        async with up.client.get("/readyz") as r:
            assert r.status == 200, await r.text()
        used = (await usage(up.client))["limits"]["images_per_day"]["used"]
        assert used == (2 if code is None else 0)
        return answer
    finally:
        up.fake.release()
        await server.close()
