"""``kind: openai_edits``: gpt-image through ``/v1/images/edits``, resized to the size."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fakes_upstreams import RETIRED_IMAGE_MODELS, OpenAIEditsFake, Recorded
from instrumented_backend import usage, vary
from support import png_bytes
from upstream_cases import (
    FAULT_NAMES,
    KEY,
    MATRIX,
    assert_hashed_user,
    backend_entry,
    run_fault,
    sdk_matrix,
    serve_fake,
    start_upstream,
)

from gateway.backends.base import BackendError, bad_response
from gateway.backends.http import gather_all
from gateway.backends.openai.edits import DEFAULT_PROMPT, LOOSE_PROMPT, SUBTLE_PROMPT
from gateway.keys import AUDIT, METRICS


async def test_sdk_every_size_format_and_n(gateway_client: Any) -> None:
    # Real-sized answers: ten 1024 px images take longer than the fault tests' 1 s.
    up, server = await start_upstream(gateway_client, "openai_edits", quality="low",
                                      **MATRIX)

    def check(calls: list[Recorded], n: int, size: int) -> None:
        assert len(calls) == 1  # n images in one call: gpt-image allows up to 10
        c = calls[0]
        assert c.headers["Authorization"] == f"Bearer {KEY}"
        assert "OpenAI-Organization" not in c.headers
        assert c.files["image"][1] == "image/png"
        # The strict fake refuses unknown fields: these are all the request carries.
        assert set(c.fields) == {"prompt", "model", "n", "size", "quality", "output_format",
                                 "output_compression", "safety_identifier"}
        assert c.fields["prompt"] == DEFAULT_PROMPT
        assert c.fields["model"] == "gpt-image-2"
        assert c.fields["n"] == str(n) and c.fields["size"] == "1024x1024"
        assert c.fields["quality"] == "low" and c.fields["output_format"] == "jpeg"
        assert_hashed_user(c.fields["safety_identifier"])
        assert "alice" not in c.fields["safety_identifier"]

    try:
        await sdk_matrix(up, check)
    finally:
        await server.close()


async def test_one_call_per_image_and_custom_prompt(gateway_client: Any) -> None:
    up, server = await start_upstream(gateway_client, "openai_edits", images_per_call=1,
                                      prompt="same otter, new pose",
                                      model="gpt-image-2.6-flare", quality="xhigh",
                                      complexity="medium", background="opaque",
                                      moderation="low", output_format="png")
    try:
        answer = await vary(up.client, png_bytes(64, seed=4), n=3, size="512x512")
        assert answer.status == 200, answer.body
        calls = up.fake.calls()
        assert [c.fields["n"] for c in calls] == ["1", "1", "1"]
        assert {c.fields["prompt"] for c in calls} == {"same otter, new pose"}
        assert {c.fields["model"] for c in calls} == {"gpt-image-2.6-flare"}
        assert {(c.fields["quality"], c.fields["complexity"], c.fields["background"],
                 c.fields["moderation"], c.fields["output_format"]) for c in calls} == {
            ("xhigh", "medium", "opaque", "low", "png")}
        assert "output_compression" not in calls[0].fields  # png takes none
    finally:
        await server.close()


@pytest.mark.parametrize("fault", FAULT_NAMES)
async def test_fault(gateway_client: Any, fault: str) -> None:
    await run_fault(gateway_client, "openai_edits", fault)


async def test_a_failed_call_cancels_its_sibling_calls() -> None:
    """With images_per_call < n, one failed call must not leave the others running."""
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow() -> bytes:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b""

    async def fail() -> bytes:
        await started.wait()
        raise bad_response("up", "test")

    with pytest.raises(BackendError):
        await gather_all(slow(), fail())
    assert cancelled.is_set()


@pytest.mark.parametrize("model", sorted(RETIRED_IMAGE_MODELS))
async def test_a_retired_model_is_named_and_the_route_falls_back(
        gateway_client: Any, model: str) -> None:
    fake = OpenAIEditsFake(KEY)
    server, url = await serve_fake(fake)
    try:
        client = await gateway_client(
            backends=[backend_entry("openai_edits", url, model=model),
                      {"name": "local", "kind": "procedural", "executor": "thread"}],
            route=["up", "local"])
        answer = await vary(client, png_bytes(64, seed=5), n=1)
        assert answer.status == 200, answer.body
        assert answer.headers["X-Cache"] == "MISS"
        pinned = await vary(client, png_bytes(64, seed=6), n=1, model="up")
        assert pinned.status == 502
        error = pinned.body["error"]
        assert error["code"] == "upstream_model_retired"
        assert model in error["message"] and "'up'" in error["message"]
        assert KEY not in repr(pinned.body) and url not in repr(pinned.body)
        assert pinned.headers["x-should-retry"] == "false"
        assert len(fake.calls()) == 2  # one per request: never retried
        failures = client.app[METRICS].registry.get_sample_value(
            "variations_gateway_backend_errors_total", {"backend": "up", "kind": "model_retired"})
        assert failures == 2
    finally:
        await server.close()


async def test_the_safety_refusal_is_a_content_policy_violation(gateway_client: Any) -> None:
    up, server = await start_upstream(gateway_client, "openai_edits")
    try:
        up.fake.inject("content_policy")
        answer = await vary(up.client, png_bytes(64, seed=8), n=1)
        assert answer.status == 400
        assert answer.body["error"]["code"] == "content_policy_violation"
        assert KEY not in repr(answer.body)
    finally:
        await server.close()


async def test_usage_is_audited_and_charged_at_token_prices(gateway_client: Any) -> None:
    prices = {"text_input": 5.0, "image_input": 8.0, "image_output": 30.0}
    up, server = await start_upstream(gateway_client, "openai_edits", token_prices=prices)
    try:
        answer = await vary(up.client, png_bytes(64, seed=9), n=2, size="512x512")
        assert answer.status == 200, answer.body
        # The fake reports 50 text + 323 image input tokens and 272 output per image.
        expected = round((50 * 5.0 + 323 * 8.0 + 2 * 272 * 30.0) / 1e6, 6)
        budget = (await usage(up.client))["limits"]["budget_usd_per_month"]
        assert budget["used"] == expected
        rows = [r for r in up.client.app[AUDIT].query(member="alice") if r["n"]]
        assert rows[0]["cost_usd"] == expected
        assert (rows[0]["usage_input_tokens"], rows[0]["usage_output_tokens"]) == (373, 544)
    finally:
        await server.close()


async def test_without_token_prices_the_quality_estimate_is_charged(
        gateway_client: Any) -> None:
    up, server = await start_upstream(gateway_client, "openai_edits", quality="medium",
                                      pricing={"medium": 0.05})
    try:
        answer = await vary(up.client, png_bytes(64, seed=10), n=3, size="256x256")
        assert answer.status == 200, answer.body
        budget = (await usage(up.client))["limits"]["budget_usd_per_month"]
        assert budget["used"] == 0.15
    finally:
        await server.close()


async def test_the_default_config_returns_images_from_the_strict_fake(
        gateway_client: Any) -> None:
    """Only base_url and key set: every default (model, quality, output format) is one the
    strict fake, following the live API, accepts."""
    fake = OpenAIEditsFake(KEY)
    server, url = await serve_fake(fake)
    try:
        client = await gateway_client(backends=[{
            "name": "gpt-image", "kind": "openai_edits", "base_url": url + "/v1",
            "api_key": KEY, "timeout_seconds": 60}], route=["gpt-image"])
        answer = await vary(client, png_bytes(64, seed=11), n=2, size="1024x1024",
                            user="artist-7")
        assert answer.status == 200, answer.body
        sent = fake.calls()[0].fields
        assert sent["model"] == "gpt-image-2" and sent["output_format"] == "jpeg"
        assert_hashed_user(sent["safety_identifier"])
    finally:
        await server.close()


@pytest.mark.parametrize(("strength", "wording"), [
    (None, DEFAULT_PROMPT), (0.1, SUBTLE_PROMPT), (0.5, DEFAULT_PROMPT),
    (0.9, LOOSE_PROMPT)])
async def test_strength_picks_the_wording_and_the_hint_joins_it(
        gateway_client: Any, strength: float | None, wording: str) -> None:
    up, server = await start_upstream(gateway_client, "openai_edits")
    controls: dict[str, Any] = {"prompt": "autumn colours"}
    if strength is not None:
        controls["strength"] = strength
    try:
        answer = await vary(up.client, png_bytes(64, seed=41), n=1, **controls)
        assert answer.status == 200, answer.body
        assert up.fake.calls()[-1].fields["prompt"] == f"{wording} Hint: autumn colours"
    finally:
        await server.close()


async def test_a_seed_is_refused_gpt_image_has_none(gateway_client: Any) -> None:
    up, server = await start_upstream(gateway_client, "openai_edits")
    try:
        answer = await vary(up.client, png_bytes(64, seed=42), n=1, seed=7)
        assert answer.status == 400
        error = answer.body["error"]
        assert (error["param"], error["code"]) == ("seed", "unsupported_parameter")
        assert up.fake.calls() == []
        assert (await usage(up.client))["limits"]["images_per_day"]["used"] == 0
    finally:
        await server.close()
