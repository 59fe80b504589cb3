"""``kind: sdwebui``: Stable Diffusion WebUI ``img2img`` with basic auth."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from fakes_upstreams import Recorded
from upstream_cases import FAULT_NAMES, KEY, SD_USER, run_fault, sdk_matrix, start_upstream

EXPECTED_KEYS = {"init_images", "resize_mode", "denoising_strength", "prompt",
                 "negative_prompt", "steps", "cfg_scale", "sampler_name", "width", "height",
                 "batch_size", "n_iter", "seed", "send_images", "save_images",
                 "override_settings", "override_settings_restore_afterwards"}


async def test_sdk_every_size_format_and_n(gateway_client: Any) -> None:
    up, server = await start_upstream(
        gateway_client, "sdwebui", prompt="oil painting", negative_prompt="blurry",
        denoising_strength=0.6, steps=12, cfg_scale=6.5, sampler_name="DPM++ 2M",
        checkpoint="sd15.safetensors")
    basic = "Basic " + base64.b64encode(f"{SD_USER}:{KEY}".encode()).decode()

    def check(calls: list[Recorded], n: int, size: int) -> None:
        assert len(calls) == 1  # one call, batch_size = n
        c = calls[0]
        assert c.headers["Authorization"] == basic
        body = c.json
        assert set(body) == EXPECTED_KEYS
        assert base64.b64decode(body["init_images"][0]).startswith(b"\x89PNG")
        assert body["batch_size"] == n and body["n_iter"] == 1
        assert body["width"] == body["height"] == 512  # native size, then resized
        assert isinstance(body["seed"], int) and body["seed"] >= 0
        assert (body["prompt"], body["negative_prompt"]) == ("oil painting", "blurry")
        assert (body["denoising_strength"], body["steps"], body["cfg_scale"]) == (0.6, 12, 6.5)
        assert body["sampler_name"] == "DPM++ 2M"
        assert body["override_settings"] == {"sd_model_checkpoint": "sd15.safetensors"}

    try:
        await sdk_matrix(up, check)
    finally:
        await server.close()


@pytest.mark.parametrize("fault", FAULT_NAMES)
async def test_fault(gateway_client: Any, fault: str) -> None:
    await run_fault(gateway_client, "sdwebui", fault)
