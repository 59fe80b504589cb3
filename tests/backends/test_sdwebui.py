"""``kind: sdwebui``: Stable Diffusion WebUI ``img2img`` with basic auth.

Besides the shared matrix: the checkpoint check (WebUI silently draws with the loaded
model when ``override_settings`` names an unknown checkpoint, so the gateway compares
the model ``info`` names with the configured one), and the fake's own realism, in both
error flavours (A1111 and Forge).
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import aiohttp
import pytest
import structlog
from fakes_upstreams import SD15, SDXL, Recorded, SdWebUIFake
from instrumented_backend import usage, vary
from PIL import Image
from support import png_bytes
from upstream_cases import (
    FAULT_NAMES,
    KEY,
    MATRIX,
    NAME,
    SD_USER,
    backend_entry,
    run_fault,
    sdk_matrix,
    serve_fake,
    start_upstream,
)

from gateway.backends.sdwebui import SdWebUIBackend, model_id, same_model

EXPECTED_KEYS = {"init_images", "resize_mode", "denoising_strength", "prompt",
                 "negative_prompt", "steps", "cfg_scale", "sampler_name", "width", "height",
                 "batch_size", "n_iter", "seed", "send_images", "save_images",
                 "override_settings", "override_settings_restore_afterwards"}
BASIC = "Basic " + base64.b64encode(f"{SD_USER}:{KEY}".encode()).decode()
FLAVOURS = ("a1111", "forge")


async def test_sdk_every_size_format_and_n(gateway_client: Any) -> None:
    # SDXL is installed but not loaded: the override switches to it, and info says so.
    up, server = await start_upstream(
        gateway_client, "sdwebui", prompt="oil painting", negative_prompt="blurry",
        denoising_strength=0.6, steps=12, cfg_scale=6.5, sampler_name="DPM++ 2M",
        checkpoint=SDXL.title, **MATRIX)

    def check(calls: list[Recorded], n: int, size: int) -> None:
        assert len(calls) == 1  # one call, batch_size = n
        c = calls[0]
        assert c.headers["Authorization"] == BASIC
        body = c.json
        assert set(body) == EXPECTED_KEYS
        assert base64.b64decode(body["init_images"][0]).startswith(b"\x89PNG")
        assert body["batch_size"] == n and body["n_iter"] == 1
        assert body["width"] == body["height"] == 512  # native size, then resized
        assert isinstance(body["seed"], int) and body["seed"] >= 0
        assert (body["prompt"], body["negative_prompt"]) == ("oil painting", "blurry")
        assert (body["denoising_strength"], body["steps"], body["cfg_scale"]) == (0.6, 12, 6.5)
        assert body["sampler_name"] == "DPM++ 2M"
        assert body["override_settings"] == {"sd_model_checkpoint": SDXL.title}

    try:
        await sdk_matrix(up, check)
    finally:
        await server.close()


@pytest.mark.parametrize("fault", FAULT_NAMES)
async def test_fault(gateway_client: Any, fault: str) -> None:
    await run_fault(gateway_client, "sdwebui", fault)


# --------------------------------------------------------------------------- checkpoint


@pytest.mark.parametrize(("configured", "name", "digest", "verdict"), [
    ("sd_xl_base_1.0.safetensors [31e35c80fc]", "sd_xl_base_1.0", "31e35c80fc", True),
    ("sd_xl_base_1.0.safetensors", "sd_xl_base_1.0", None, True),
    ("sd_xl_base_1.0", "sd_xl_base_1.0", "31e35c80fc", True),  # ".0" is no extension
    ("SDXL/SD_XL_Base_1.0.ckpt", "sd_xl_base_1.0", None, True),  # sub-folder, case
    ("31e35c80fc", "sd_xl_base_1.0", "31e35c80fc", True),  # a bare shorthash
    (SDXL.sha256, None, "31e35c80fc", True),  # sha256 vs shorthash: a prefix
    ("renamed.safetensors [31e35c80fc]", "sd_xl_base_1.0", "31e35c80fc", True),
    ("sd_xl_base_1.0.safetensors [31e35c80fc]", "v1-5-pruned-emaonly", "6ce0161689", False),
    ("sd_xl_base_1.0", "v1-5-pruned-emaonly", None, False),
    ("31e35c80fc", None, "6ce0161689", False),
    ("0badf00d", None, "0badf00d99", False),  # old 8-digit hash: exact match only
    ("sd_xl_base_1.0", None, "31e35c80fc", None),  # nothing comparable
    ("31e35c80fc", "sd_xl_base_1.0", None, None),  # a hash, and info has none
    ("sd_xl_base_1.0", None, None, None),
])
def test_model_comparison(configured: str, name: str | None, digest: str | None,
                          verdict: bool | None) -> None:
    assert same_model(model_id(configured), model_id(name, digest)) is verdict


async def test_checkpoint_mismatch_is_a_502_and_nothing_is_cached(gateway_client: Any) -> None:
    """SDXL is not installed: WebUI ignores the override and draws with SD 1.5."""
    fake = SdWebUIFake((SD_USER, KEY), checkpoints=(SD15,), loaded=SD15)
    up, server = await start_upstream(gateway_client, "sdwebui", fake=fake,
                                      checkpoint=SDXL.title)
    image = png_bytes(64, seed=11)
    try:
        for attempt in (1, 2):
            answer = await vary(up.client, image, n=2, size="256x256")
            assert answer.status == 502, answer.body
            error = answer.body["error"]
            assert error["code"] == "upstream_model_mismatch"
            assert all(s in error["message"] for s in (
                repr(NAME), "v1-5-pruned-emaonly", SDXL.title))
            raw = json.dumps(answer.body) + repr(dict(answer.headers))
            assert KEY not in raw and up.url not in raw and "127.0.0.1" not in raw
            assert answer.headers.get("X-Cache") != "HIT"
            assert answer.headers["x-should-retry"] == "false"
            # One call per request: not retried on this backend, and not served from
            # the cache the second time.
            assert len(fake.calls()) == attempt
        assert up.metric("backend_errors_total", kind="model_mismatch") == 2
        assert up.metric("backend_retries_total") == 0
        assert (await usage(up.client))["limits"]["images_per_day"]["used"] == 0
        # Once the admin installs the checkpoint, the same request is a cache MISS.
        fake.checkpoints.append(SDXL)
        answer = await vary(up.client, image, n=2, size="256x256")
        assert answer.status == 200, answer.body
        assert answer.headers["X-Cache"] == "MISS" and len(fake.calls()) == 3
    finally:
        await server.close()


async def test_mismatch_trips_the_breaker_and_the_route_falls_back(gateway_client: Any
                                                                   ) -> None:
    fake = SdWebUIFake((SD_USER, KEY), checkpoints=(SD15,), loaded=SD15)
    server, url = await serve_fake(fake)
    entry = backend_entry("sdwebui", url, checkpoint="sd_xl_base_1.0",
                          breaker={"failure_threshold": 1, "cooldown_seconds": 300.0})
    client = await gateway_client(backends=[entry, {"name": "local", "kind": "procedural"}],
                                  route=[NAME, "local"])
    try:
        first = await vary(client, png_bytes(64, seed=1), n=1)
        assert first.status == 200, first.body  # drawn by the procedural backend
        assert len(fake.calls()) == 1
        second = await vary(client, png_bytes(64, seed=2), n=1)
        assert second.status == 200, second.body
        assert len(fake.calls()) == 1  # the breaker is open: the upstream is skipped
    finally:
        await server.close()


@pytest.mark.parametrize("checkpoint", [
    "sd_xl_base_1.0", "sd_xl_base_1.0.safetensors", "31e35c80fc", SDXL.sha256,
    "sd_xl_base_1.0 [31e35c80fc]",
])
async def test_every_alias_of_the_checkpoint_is_accepted(gateway_client: Any,
                                                         checkpoint: str) -> None:
    up, server = await start_upstream(gateway_client, "sdwebui", checkpoint=checkpoint)
    assert isinstance(up.fake, SdWebUIFake) and up.fake.loaded == SD15
    try:
        answer = await vary(up.client, png_bytes(64), n=2)
        assert answer.status == 200, answer.body
        # SD 1.5 is loaded: a 200 means the alias switched the model and info named it.
        assert up.fake.calls()[0].json["override_settings"] == {
            "sd_model_checkpoint": checkpoint}
    finally:
        await server.close()


async def test_without_a_checkpoint_there_is_no_check(gateway_client: Any) -> None:
    up, server = await start_upstream(gateway_client, "sdwebui")
    try:
        answer = await vary(up.client, png_bytes(64), n=1)
        assert answer.status == 200, answer.body
        assert "override_settings" not in up.fake.calls()[0].json
    finally:
        await server.close()


async def test_info_without_a_model_name_is_accepted_with_one_warning(gateway_client: Any
                                                                      ) -> None:
    fake = SdWebUIFake((SD_USER, KEY), checkpoints=(SD15,), loaded=SD15)
    fake.name_model_in_info = False
    up, server = await start_upstream(gateway_client, "sdwebui", fake=fake,
                                      checkpoint=SDXL.title)
    try:
        with structlog.testing.capture_logs() as logs:
            for seed in (1, 2):
                answer = await vary(up.client, png_bytes(64, seed=seed), n=1)
                assert answer.status == 200, answer.body
        warned = [e for e in logs if e["event"] == "sdwebui_model_unverified"]
        assert len(warned) == 1 and warned[0]["backend"] == NAME
        assert len(fake.calls()) == 2
    finally:
        await server.close()


# --------------------------------------------------------------------------- the fake


async def _post(url: str, path: str, body: Any, auth: str | None = BASIC
                ) -> tuple[int, Any]:
    headers = {"Authorization": auth} if auth is not None else {}
    async with aiohttp.ClientSession() as s, s.post(url + path, json=body,
                                                    headers=headers) as r:
        return r.status, await r.json()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _expected_error(flavour: str, status: int, detail: str) -> dict[str, Any]:
    if flavour == "forge":
        return {"detail": detail}
    return {"error": "HTTPException", "detail": detail, "body": "",
            "errors": f"{status}: {detail}"}


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_fake_error_bodies(flavour: str) -> None:
    fake = SdWebUIFake((SD_USER, KEY), flavour=flavour)
    server, url = await serve_fake(fake)
    path = fake.main_path
    good = {"init_images": [_b64(png_bytes(32))]}
    wrong = "Basic " + base64.b64encode(f"{SD_USER}:nope".encode()).decode()
    try:
        assert await _post(url, path, good, auth=None) == (
            401, _expected_error(flavour, 401, "Not authenticated"))
        assert await _post(url, path, good, auth=wrong) == (
            401, _expected_error(flavour, 401, "Incorrect username or password"))
        assert await _post(url, path, {"prompt": "x"}) == (
            404, _expected_error(flavour, 404, "Init image not found"))
        for junk in ("not base64 at all", _b64(b"GIF89a but not really"),
                     "data:image/png;base64," + _b64(b"\x89PNG broken")):
            assert await _post(url, path, {"init_images": [junk]}) == (
                500, _expected_error(flavour, 500, "Invalid encoded image"))
        assert await _post(url, "/sdapi/v1/interrupt", None) == (200, {})
        assert fake.interrupts == 1
    finally:
        await server.close()


async def test_fake_defaults_prefix_seeds_and_unknown_checkpoints() -> None:
    fake = SdWebUIFake()
    server, url = await serve_fake(fake)
    try:
        # Only init_images (with a data: prefix), plus a key WebUI does not know.
        status, body = await _post(url, fake.main_path, {
            "init_images": ["data:image/png;base64," + _b64(png_bytes(32))],
            "no_such_field": 1}, auth=None)
        assert status == 200, body
        (only,) = body["images"]
        assert Image.open(io.BytesIO(base64.b64decode(only))).size == (512, 512)
        info = json.loads(body["info"])
        assert info["sd_model_name"] == "v1-5-pruned-emaonly"
        assert info["sd_model_hash"] == SD15.shorthash
        # A batch: image i gets seed + i; an unknown checkpoint is ignored.
        status, body = await _post(url, fake.main_path, {
            "init_images": [_b64(png_bytes(32))], "seed": 100, "batch_size": 3,
            "width": 64, "height": 96,
            "override_settings": {"sd_model_checkpoint": "nonexistent.safetensors"}})
        assert status == 200, body
        info = json.loads(body["info"])
        assert (info["seed"], info["all_seeds"]) == (100, [100, 101, 102])
        assert info["sd_model_name"] == "v1-5-pruned-emaonly"
        assert len(body["images"]) == 3
        sizes = {Image.open(io.BytesIO(base64.b64decode(i))).size for i in body["images"]}
        assert sizes == {(64, 96)}
    finally:
        await server.close()


@pytest.mark.parametrize(("samples_format", "pil_format"),
                         [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP")])
async def test_fake_samples_format_and_grid(samples_format: str, pil_format: str) -> None:
    fake = SdWebUIFake(samples_format=samples_format)
    server, url = await serve_fake(fake)
    try:
        status, body = await _post(url, fake.main_path, {
            "init_images": [_b64(png_bytes(32))], "batch_size": 2, "width": 64,
            "height": 64, "save_images": True})
        assert status == 200, body
        images = [Image.open(io.BytesIO(base64.b64decode(i))) for i in body["images"]]
        assert {i.format for i in images} == {pil_format}
        assert [i.size for i in images] == [(128, 64), (64, 64), (64, 64)]  # grid first
    finally:
        await server.close()


# --------------------------------------------------------------------------- mapping


def _patch_init(monkeypatch: pytest.MonkeyPatch, init: str | None) -> None:
    """Make the backend send ``init`` as its init image (``None``: no init_images)."""
    original = SdWebUIBackend.payload

    def payload(self: SdWebUIBackend, *args: Any) -> dict[str, Any]:
        body = original(self, *args)
        if init is None:
            del body["init_images"]
        else:
            body["init_images"] = [init.replace("{png}", body["init_images"][0])]
        return body

    monkeypatch.setattr(SdWebUIBackend, "payload", payload)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(("case", "status", "code", "calls"), [
    ("data_prefix", 200, None, 1),
    ("no_init_image", 502, "upstream_rejected", 1),  # 404: retrying cannot help
    # 500 "Invalid encoded image": deterministic, so not retried (README, Retries)
    ("bad_init_image", 502, "upstream_error", 1),
    ("wrong_password", 502, "upstream_auth_error", 1),
])
async def test_both_flavours_map_to_the_same_client_errors(
        gateway_client: Any, monkeypatch: pytest.MonkeyPatch, flavour: str, case: str,
        status: int, code: str | None, calls: int) -> None:
    fake = SdWebUIFake((SD_USER, KEY), flavour=flavour)
    if case == "data_prefix":
        _patch_init(monkeypatch, "data:image/png;base64,{png}")
    elif case == "no_init_image":
        _patch_init(monkeypatch, None)
    elif case == "bad_init_image":
        _patch_init(monkeypatch, "data:image/png;base64,AAAA")
    extra = {"password": KEY + "-old"} if case == "wrong_password" else {}
    up, server = await start_upstream(gateway_client, "sdwebui", fake=fake, **extra)
    try:
        answer = await vary(up.client, png_bytes(64), n=2)
        assert answer.status == status, answer.body
        assert len(fake.calls()) == calls
        if code is None:
            assert len(answer.body["data"]) == 2
            assert fake.calls()[0].json["init_images"][0].startswith("data:image/png;")
        else:
            assert answer.body["error"]["code"] == code
            raw = json.dumps(answer.body)
            assert KEY not in raw and up.url not in raw and "detail" not in raw
    finally:
        await server.close()


async def test_the_variation_controls_reach_img2img(gateway_client: Any) -> None:
    """strength -> denoising_strength, seed -> seed of each batch (image i: seed + i),
    the hint appended to the configured prompt."""
    up, server = await start_upstream(gateway_client, "sdwebui", prompt="oil painting",
                                      max_batch_size=2)
    try:
        answer = await vary(up.client, png_bytes(64, seed=21), n=3, strength=0.7,
                            seed=1234, prompt="autumn colours")
        assert answer.status == 200, answer.body
        bodies = [c.json for c in up.fake.calls("/sdapi/v1/img2img")]
        assert [(b["seed"], b["batch_size"]) for b in bodies] == [(1234, 2), (1236, 1)]
        assert {b["denoising_strength"] for b in bodies} == {0.7}
        assert {b["prompt"] for b in bodies} == {"oil painting, autumn colours"}
        # Without controls: the configured strength and prompt.
        plain = await vary(up.client, png_bytes(64, seed=22), n=1)
        assert plain.status == 200, plain.body
        last = up.fake.calls("/sdapi/v1/img2img")[-1].json
        assert (last["denoising_strength"], last["prompt"]) == (0.55, "oil painting")
    finally:
        await server.close()
