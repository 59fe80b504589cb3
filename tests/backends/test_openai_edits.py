"""``kind: openai_edits``: gpt-image through ``/v1/images/edits``, resized to the size."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fakes_upstreams import Recorded
from instrumented_backend import vary
from support import png_bytes
from upstream_cases import (
    FAULT_NAMES,
    KEY,
    assert_hashed_user,
    run_fault,
    sdk_matrix,
    start_upstream,
)

from gateway.backends.base import BackendError
from gateway.backends.http import bad_response, gather_all
from gateway.backends.openai_edits import DEFAULT_PROMPT


async def test_sdk_every_size_format_and_n(gateway_client: Any) -> None:
    up, server = await start_upstream(gateway_client, "openai_edits", quality="low")

    def check(calls: list[Recorded], n: int, size: int) -> None:
        assert len(calls) == 1  # n images in one call: gpt-image allows up to 10
        c = calls[0]
        assert c.headers["Authorization"] == f"Bearer {KEY}"
        assert "OpenAI-Organization" not in c.headers
        assert c.files["image"][1] == "image/png"
        assert set(c.fields) == {"prompt", "model", "n", "size", "quality", "user"}
        assert c.fields["prompt"] == DEFAULT_PROMPT
        assert c.fields["model"] == "gpt-image-1-mini"
        assert c.fields["n"] == str(n) and c.fields["size"] == "1024x1024"
        assert c.fields["quality"] == "low"
        assert_hashed_user(c.fields["user"])

    try:
        await sdk_matrix(up, check)
    finally:
        await server.close()


async def test_one_call_per_image_and_custom_prompt(gateway_client: Any) -> None:
    up, server = await start_upstream(gateway_client, "openai_edits", images_per_call=1,
                                      prompt="same otter, new pose", model="gpt-image-1")
    try:
        answer = await vary(up.client, png_bytes(64, seed=4), n=3, size="512x512")
        assert answer.status == 200, answer.body
        calls = up.fake.calls()
        assert [c.fields["n"] for c in calls] == ["1", "1", "1"]
        assert {c.fields["prompt"] for c in calls} == {"same otter, new pose"}
        assert {c.fields["model"] for c in calls} == {"gpt-image-1"}
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
