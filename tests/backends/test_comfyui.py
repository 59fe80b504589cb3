"""``kind: comfyui``: upload, queue the example workflow, follow history, fetch /view."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from fakes_upstreams import ComfyUIFake, Recorded
from instrumented_backend import poll, vary
from support import png_bytes
from upstream_cases import (
    FAULT_NAMES,
    KEY,
    NAME,
    WORKFLOW,
    backend_entry,
    make_fake,
    run_fault,
    sdk_matrix,
    serve_fake,
    start_upstream,
)

from gateway.backends.comfyui import fill, load_workflow
from gateway.keys import METRICS


async def test_sdk_every_size_format_and_n(gateway_client: Any) -> None:
    fake = make_fake("comfyui")
    assert isinstance(fake, ComfyUIFake)
    up, server = await start_upstream(gateway_client, "comfyui", fake=fake,
                                      prompt="watercolour")

    def check(calls: list[Recorded], n: int, size: int) -> None:
        assert len(calls) == 1
        body = calls[0].json
        assert set(body) == {"prompt", "client_id"}
        wf = body["prompt"]
        image = wf["2"]["inputs"]["image"]
        assert image in fake.uploads and fake.uploads[image].startswith(b"\x89PNG")
        assert wf["5"]["inputs"]["amount"] == n  # batch size, a number
        assert isinstance(wf["8"]["inputs"]["seed"], int)
        assert wf["3"]["inputs"]["width"] == wf["3"]["inputs"]["height"] == 512
        assert wf["6"]["inputs"]["text"] == "watercolour"
        for r in fake.requests:
            assert r.headers["Authorization"] == f"Bearer {KEY}"

    try:
        await sdk_matrix(up, check)
        # History was polled until done; every output was fetched through /view.
        assert all(count == fake.pending_polls + 1 for count in fake.polls.values())
        assert len(fake.calls("/view")) == 3 * 2 * 11
        assert len(fake.calls("/upload/image")) == 12
    finally:
        await server.close()


async def test_workflow_error_is_a_502(gateway_client: Any) -> None:
    fake = make_fake("comfyui")
    assert isinstance(fake, ComfyUIFake)
    fake.workflow_error = True
    up, server = await start_upstream(gateway_client, "comfyui", fake=fake)
    try:
        answer = await vary(up.client, png_bytes(64), n=1)
        assert answer.status == 502 and answer.body["error"]["code"] == "upstream_error"
        assert len(fake.calls()) == 1  # a broken workflow is not retried
    finally:
        await server.close()


async def test_abandoned_prompt_is_removed_from_the_queue(gateway_client: Any) -> None:
    """A run that outlives timeout_seconds is deleted from ComfyUI's queue."""
    fake = make_fake("comfyui")
    assert isinstance(fake, ComfyUIFake)
    fake.pending_polls = 10**9  # never finishes
    up, server = await start_upstream(gateway_client, "comfyui", fake=fake,
                                      timeout_seconds=0.5)
    try:
        answer = await vary(up.client, png_bytes(64), n=1)
        assert answer.status == 504
        [prompt_id] = fake.prompts
        await poll(lambda: prompt_id in fake.deleted, "the prompt deleted from the queue")
        # The interrupt follows the delete: wait for it too, then check what it named.
        await poll(lambda: bool(fake.calls("/interrupt")), "the run interrupted")
        assert fake.calls("/interrupt")[0].json == {"prompt_id": prompt_id}
    finally:
        await server.close()


async def string_status_fake() -> tuple[TestServer, str]:
    """A fork or proxy answering ``"status": "success"`` (and no outputs)."""
    fake = make_fake("comfyui")
    assert isinstance(fake, ComfyUIFake)
    fake.status_as_string = True
    return await serve_fake(fake)


async def test_a_history_status_that_is_no_object_is_a_bad_response(
        gateway_client: Any) -> None:
    server, url = await string_status_fake()
    try:
        client = await gateway_client(backends=[backend_entry("comfyui", url)], route=[NAME])
        answer = await vary(client, png_bytes(64), n=1)
        assert answer.status == 502, answer.body
        assert answer.body["error"]["code"] == "upstream_bad_response"
    finally:
        await server.close()


async def test_a_history_status_that_is_no_object_falls_back(gateway_client: Any) -> None:
    """The breaker counts it, and the route's next backend answers instead."""
    server, url = await string_status_fake()
    try:
        client = await gateway_client(
            backends=[backend_entry("comfyui", url), {"name": "local", "kind": "procedural"}],
            route=[NAME, "local"])
        answer = await vary(client, png_bytes(64), n=1)
        assert answer.status == 200, answer.body
        registry = client.app[METRICS].registry
        assert registry.get_sample_value("variations_gateway_backend_errors_total",
                                         {"backend": NAME, "kind": "bad_response"}) == 1
        assert registry.get_sample_value("variations_gateway_images_generated_total",
                                         {"backend": "local", "size": "256x256"}) == 1
        async with client.get("/readyz") as r:
            backends = (await r.json())["checks"]["backends"]
        assert backends[NAME]["consecutive_failures"] == 1
    finally:
        await server.close()


def test_template_placeholders(tmp_path: Any) -> None:
    template, _ = load_workflow(WORKFLOW)
    filled = fill(template, {"image": "a.png", "seed": 7, "batch_size": 3, "width": 512,
                             "height": 512, "prompt": "p", "negative_prompt": "n"})
    assert "{{" not in json.dumps(filled)
    assert filled["8"]["inputs"]["seed"] == 7 and filled["2"]["inputs"]["image"] == "a.png"
    bad = tmp_path / "wf.json"
    bad.write_text('{"1": {"class_type": "LoadImage", "inputs": {"image": "fixed.png"}}}')
    with pytest.raises(ValueError, match="placeholder"):
        load_workflow(str(bad))


@pytest.mark.parametrize("fault", FAULT_NAMES)
async def test_fault(gateway_client: Any, fault: str) -> None:
    await run_fault(gateway_client, "comfyui", fault)
