"""``kind: openai``: another server that still speaks ``/v1/images/variations``."""

from __future__ import annotations

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


async def test_sdk_every_size_format_and_n(gateway_client: Any) -> None:
    up, server = await start_upstream(gateway_client, "openai", organization="org-art",
                                      project="proj-1")

    def check(calls: list[Recorded], n: int, size: int) -> None:
        assert len(calls) == 1
        c = calls[0]
        assert c.headers["Authorization"] == f"Bearer {KEY}"
        assert c.headers["OpenAI-Organization"] == "org-art"
        assert c.headers["OpenAI-Project"] == "proj-1"
        assert c.headers["Content-Type"].startswith("multipart/form-data; boundary=")
        _, content_type, body = c.files["image"]
        assert content_type == "image/png" and body.startswith(b"\x89PNG")
        assert set(c.fields) == {"model", "n", "size", "response_format", "user"}
        assert c.fields["model"] == "dall-e-2" and c.fields["n"] == str(n)
        assert c.fields["size"] == f"{size}x{size}"
        assert c.fields["response_format"] == "b64_json"
        assert_hashed_user(c.fields["user"])

    try:
        await sdk_matrix(up, check)
    finally:
        await server.close()


async def test_upstream_urls_are_downloaded_without_the_key(gateway_client: Any) -> None:
    """An upstream answering URLs: the gateway fetches and stores the bytes itself."""
    up, server = await start_upstream(gateway_client, "openai", response_format="url")
    try:
        answer = await vary(up.client, png_bytes(64, seed=3), n=3, size="512x512",
                            response_format="url")
        assert answer.status == 200, answer.body
        assert up.fake.calls()[0].fields["response_format"] == "url"
        downloads = up.fake.calls("/files/" + next(iter(up.fake.files)))
        assert len([r for r in up.fake.requests if r.path.startswith("/files/")]) == 3
        for r in up.fake.requests:
            if r.path.startswith("/files/"):
                assert "Authorization" not in r.headers
        for item in answer.body["data"]:
            assert item["url"].startswith(str(up.client.make_url("/v1/images/files/")))
            assert up.url not in item["url"]
        assert downloads
    finally:
        await server.close()


@pytest.mark.parametrize("fault", FAULT_NAMES)
async def test_fault(gateway_client: Any, fault: str) -> None:
    await run_fault(gateway_client, "openai", fault)


async def test_a_key_ending_in_a_newline_still_authenticates(gateway_client: Any) -> None:
    """A key from a secret file (trailing newline) once made every request a 500."""
    up, server = await start_upstream(gateway_client, "openai", key=KEY + "\n")
    try:
        answer = await vary(up.client, png_bytes(64), n=1)
        assert answer.status == 200, answer.body
        assert up.fake.calls()[0].headers["Authorization"] == f"Bearer {KEY}"
    finally:
        await server.close()
