"""``kind: comfyui``: upload, queue the example workflow, follow history, fetch /view;
a failed, partial, interrupted or vanished run is a clear 502; an abandoned run is
cancelled the way the server in front of us can."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp.test_utils import TestServer
from fakes_upstreams import TRACEBACK_LINE, ComfyUIFake, Recorded
from instrumented_backend import vary
from support import auth, eventually, png_bytes
from upstream_cases import (
    FAULT_NAMES,
    HANG_GUARD_S,
    KEY,
    MATRIX,
    NAME,
    WORKFLOW,
    backend_entry,
    make_fake,
    run_fault,
    sdk_matrix,
    serve_fake,
    start_upstream,
)

from gateway.backends.comfyui import ComfyUIBackend, ComfyUIOptions, fill, load_workflow
from gateway.generation import SourceImage, VariationRequest
from gateway.keys import METRICS


def comfy_fake() -> ComfyUIFake:
    fake = make_fake("comfyui")
    assert isinstance(fake, ComfyUIFake)
    return fake


async def test_sdk_every_size_format_and_n(gateway_client: Any) -> None:
    fake = comfy_fake()
    up, server = await start_upstream(gateway_client, "comfyui", fake=fake,
                                      prompt="watercolour", **MATRIX)

    def check(calls: list[Recorded], n: int, size: int) -> None:
        assert len(calls) == 1
        body = calls[0].json
        assert set(body) == {"prompt", "client_id", "prompt_id"}
        assert str(uuid.UUID(body["prompt_id"])) == body["prompt_id"]  # canonical
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
        # Every finished run's history entry was deleted; nothing was cancelled.
        await eventually(lambda: set(fake.history_deleted) == set(fake.prompts),
                         "every history entry deleted")
        assert fake.history_entries == {}
        assert fake.job_cancels == fake.deleted == fake.interrupts == []
    finally:
        await server.close()


async def failing(gateway_client: Any, fake: ComfyUIFake, **backend: Any
                  ) -> tuple[Any, list[dict[str, Any]]]:
    """One request against ``fake`` with a 30 s backend timeout: its answer must come
    from the failure, not from the deadline (the guard only stops a hang)."""
    up, server = await start_upstream(gateway_client, "comfyui", fake=fake,
                                      timeout_seconds=30.0, **backend)
    try:
        with structlog.testing.capture_logs() as logs:
            answer = await asyncio.wait_for(vary(up.client, png_bytes(64), n=1),
                                            HANG_GUARD_S)
        raw = json.dumps(answer.body)
        assert KEY not in raw and up.url not in raw and "127.0.0.1" not in raw
        assert answer.status == 502, answer.body
        return answer, logs
    finally:
        fake.release()
        await server.close()


async def test_execution_error_is_a_clear_502(gateway_client: Any) -> None:
    fake = comfy_fake()
    fake.execution_error = True
    answer, logs = await failing(gateway_client, fake)
    error = answer.body["error"]
    assert error["code"] == "upstream_error"
    message = error["message"]
    assert "KSampler" in message and "OutOfMemoryError: Allocation on device 0" in message
    # Untrusted text: one line, no escape sequences, no URL, no traceback, short.
    assert "\n" not in message and "\x1b" not in message and "pytorch.org" not in message
    assert "/srv/ComfyUI" not in message and len(message) < 260
    assert len(fake.calls()) == 1  # a failed run is not retried
    [event] = [e for e in logs if e["event"] == "comfyui_execution_error"]
    assert event["node_type"] == "KSampler" and event["node_id"] == "8"
    assert event["exception_type"] == "torch.OutOfMemoryError"
    assert event["exception_message"].startswith("Allocation on device 0")
    assert TRACEBACK_LINE.strip() not in repr(logs) and "\x1b" not in repr(logs)
    # The failed run's history entry is dropped too.
    [prompt_id] = fake.prompts
    await eventually(lambda: prompt_id in fake.history_deleted, "history entry deleted")


async def test_interrupted_run_is_a_clear_502(gateway_client: Any) -> None:
    fake = comfy_fake()
    fake.interrupted = True  # someone else pressed cancel
    answer, _ = await failing(gateway_client, fake)
    assert answer.body["error"]["code"] == "upstream_error"
    assert "interrupted" in answer.body["error"]["message"]


async def test_partial_node_errors_are_a_502_and_the_run_is_cancelled(
        gateway_client: Any) -> None:
    fake = comfy_fake()
    fake.partial_node_errors = True
    fake.pending_polls = 10**9  # what was queued would run on, for nobody
    answer, logs = await failing(gateway_client, fake)
    error = answer.body["error"]
    assert error["code"] == "upstream_rejected"
    assert "rejected part of the workflow" in error["message"]
    assert "CheckpointLoaderSimple" in error["message"]
    assert len(fake.calls()) == 1
    [prompt_id] = fake.prompts
    await eventually(lambda: prompt_id in fake.job_cancels, "the queued run cancelled")
    assert fake.running is None and fake.pending == []
    assert any(e["event"] == "comfyui_node_errors" for e in logs)


async def test_vanished_prompt_is_a_clear_502(gateway_client: Any) -> None:
    fake = comfy_fake()
    fake.vanish = True  # deleted from the queue by someone else: never in history
    answer, logs = await failing(gateway_client, fake, vanished_grace_seconds=0.2)
    error = answer.body["error"]
    assert error["code"] == "upstream_error"
    assert "vanished from the ComfyUI queue" in error["message"]
    assert fake.calls("/queue")  # it looked in the queue, not only in the history
    assert any(e["event"] == "comfyui_prompt_vanished" for e in logs)


async def test_a_prompt_waiting_in_the_queue_has_not_vanished(gateway_client: Any) -> None:
    """Another client's long run keeps ours pending well past the grace period."""
    fake = comfy_fake()
    fake.busy = True
    up, server = await start_upstream(gateway_client, "comfyui", fake=fake,
                                      timeout_seconds=30.0, vanished_grace_seconds=0.05)
    try:
        task = asyncio.ensure_future(vary(up.client, png_bytes(64), n=1))
        await eventually(lambda: len(fake.calls("/queue")) >= 6, "several queue checks")
        assert not task.done() and fake.pending == list(fake.prompts)
        fake.busy = False  # the other run ends; ours runs next
        fake._advance()
        answer = await asyncio.wait_for(task, HANG_GUARD_S)
        assert answer.status == 200, answer.body
    finally:
        fake.release()
        await server.close()


async def test_abandoned_prompt_is_cancelled(gateway_client: Any) -> None:
    """A run that outlives timeout_seconds is cancelled through the jobs API."""
    fake = comfy_fake()
    fake.pending_polls = 10**9  # never finishes
    up, server = await start_upstream(gateway_client, "comfyui", fake=fake,
                                      timeout_seconds=0.5)
    try:
        answer = await vary(up.client, png_bytes(64), n=1)
        assert answer.status == 504
        [prompt_id] = fake.prompts
        await eventually(lambda: prompt_id in fake.job_cancels, "the run cancelled")
        assert fake.running is None
        assert fake.history_entries[prompt_id]["status"]["messages"][-1][0] == \
            "execution_interrupted"
        assert fake.deleted == fake.interrupts == []  # the one call did it all
    finally:
        await server.close()


# ------------------------------------------------------------------ cancel, backend level


@pytest.fixture
async def comfy() -> AsyncIterator[tuple[ComfyUIFake, ComfyUIBackend]]:
    fake = comfy_fake()
    fake.pending_polls = 10**9
    server, url = await serve_fake(fake)
    backend = ComfyUIBackend(NAME, ComfyUIOptions(
        base_url=url, workflow=WORKFLOW, api_key=KEY, poll_interval_seconds=0.01))
    await backend.start()
    try:
        yield fake, backend
    finally:
        await backend.close()
        fake.release()
        await server.close()


def variation_request() -> VariationRequest:
    png = png_bytes(64)
    source = SourceImage(png=png, width=64, height=64, pixels_sha256="p" * 64,
                         upload_sha256="u" * 64)
    return VariationRequest(image=source, n=1, size=256, user=None, request_id="r", seed=7)


async def cancel_generate(backend: ComfyUIBackend, ready: Any) -> None:
    """Start a run, wait until ``ready()``, cancel it the way a client leaving does,
    and check the CancelledError comes back out."""
    task = asyncio.ensure_future(backend.generate(variation_request()))
    await eventually(ready, "the prompt queued")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancel_on_a_new_server_uses_the_jobs_api(
        comfy: tuple[ComfyUIFake, ComfyUIBackend]) -> None:
    fake, backend = comfy
    await cancel_generate(backend, lambda: fake.running is not None)
    [prompt_id] = fake.prompts
    await eventually(lambda: fake.job_cancels == [prompt_id], "the jobs cancel call")
    assert fake.running is None and fake.deleted == fake.interrupts == []


async def test_cancel_on_an_old_server_interrupts_our_running_prompt(
        comfy: tuple[ComfyUIFake, ComfyUIBackend]) -> None:
    fake, backend = comfy
    fake.old_server = True
    await cancel_generate(backend, lambda: fake.running is not None)
    [prompt_id] = fake.prompts
    await eventually(lambda: bool(fake.interrupts), "the interrupt")
    assert fake.calls("/api/jobs/" + prompt_id + "/cancel")  # tried first, 404
    assert fake.deleted == [prompt_id]
    assert fake.interrupts == [{"prompt_id": prompt_id}]
    assert fake.running is None and fake.foreign_interrupted == 0


async def test_cancel_on_an_old_server_leaves_someone_elses_run_alone(
        comfy: tuple[ComfyUIFake, ComfyUIBackend]) -> None:
    """Ours is pending behind another client's run: deleted from the queue, and no
    /interrupt, which an old server would apply to the other client's run."""
    fake, backend = comfy
    fake.old_server = True
    fake.busy = True
    await cancel_generate(backend, lambda: bool(fake.pending))
    [prompt_id] = fake.prompts
    await eventually(lambda: fake.deleted == [prompt_id], "the queue delete")
    await eventually(lambda: len(fake.calls("/queue")) >= 2, "the running check")  # GET after POST
    await backend.close()  # waits for the clean-up to end
    assert fake.pending == [] and fake.interrupts == [] and fake.foreign_interrupted == 0


async def test_cancel_is_bounded_when_comfyui_does_not_answer(
        comfy: tuple[ComfyUIFake, ComfyUIBackend]) -> None:
    fake, backend = comfy
    backend.options = ComfyUIOptions(base_url=backend.base_url, workflow=WORKFLOW,
                                     api_key=KEY, poll_interval_seconds=0.01,
                                     cancel_timeout_seconds=0.2)
    fake.stall_cleanup = True  # the cancel calls are accepted, never answered
    with structlog.testing.capture_logs() as logs:
        await cancel_generate(backend, lambda: fake.running is not None)
        await eventually(lambda: bool(fake.calls(f"/api/jobs/{fake.running}/cancel")),
                         "the cancel call")
        # close() waits for the clean-up, which gives up on its own.
        await asyncio.wait_for(backend.close(), HANG_GUARD_S)
    [event] = [e for e in logs if e["event"] == "comfyui_prompt_cancelled"]
    assert event["how"] == "failed"
    assert fake.running is not None  # nothing reached the server's queue


# ------------------------------------------------------------------ forks and the fake


async def string_status_fake() -> tuple[TestServer, str]:
    """A fork or proxy answering ``"status": "success"`` (and no outputs)."""
    fake = comfy_fake()
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


async def test_the_fake_behaves_like_comfyui() -> None:
    """The edges the adapter relies on, checked on the fake itself."""
    fake = ComfyUIFake()
    server, url = await serve_fake(fake)
    try:
        async with aiohttp.ClientSession() as s:
            def upload(name: str, data: bytes, **fields: str) -> aiohttp.FormData:
                form = aiohttp.FormData()
                form.add_field("image", data, filename=name, content_type="image/png")
                for k, v in fields.items():
                    form.add_field(k, v)
                return form
            async with s.post(url + "/upload/image", data=upload("a.png", b"1")) as r:
                assert await r.json() == {"name": "a.png", "subfolder": "", "type": "input"}
            async with s.post(url + "/api/upload/image", data=upload("a.png", b"2")) as r:
                assert (await r.json())["name"] == "a (1).png"  # no overwrite: renamed
            async with s.post(url + "/upload/image",
                              data=upload("a.png", b"3", overwrite="true")) as r:
                assert (await r.json())["name"] == "a.png"
            async with s.post(url + "/upload/image", data=aiohttp.FormData({"x": "1"})) as r:
                assert r.status == 400 and await r.read() == b""
            async with s.post(url + "/upload/image",
                              data=upload("a.png", b"4", subfolder="../..")) as r:
                assert r.status == 400
            wf = json.loads(json.dumps(load_workflow(WORKFLOW)[0]))
            async with s.post(url + "/prompt", json={"prompt": wf}) as r:
                body = await r.json()
                assert r.status == 400 and body["error"]["type"] == \
                    "prompt_outputs_failed_validation"
                assert set(body["error"]) == {"type", "message", "details", "extra_info"}
                node = body["node_errors"]["2"]
                assert node["class_type"] == "LoadImage" and node["dependent_outputs"] == ["10"]
            filled = fill(wf, {"image": "a.png", "seed": 1, "batch_size": 1, "width": 64,
                               "height": 64, "strength": 0.5, "prompt": "",
                               "negative_prompt": ""})
            async with s.post(url + "/prompt", json={"prompt": filled, "prompt_id": "x1"}) as r:
                assert (await r.json())["error"]["type"] == "invalid_prompt_id"
            async with s.post(url + "/api/prompt", json={"prompt": filled}) as r:
                prompt_id = (await r.json())["prompt_id"]
            async with s.get(url + "/api/queue") as r:
                assert [i[1] for i in (await r.json())["queue_running"]] == [prompt_id]
            for _ in range(3):
                async with s.get(url + f"/history/{prompt_id}") as r:
                    history = await r.json()
            [image] = history[prompt_id]["outputs"]["10"]["images"]
            assert history[prompt_id]["status"]["status_str"] == "success"
            async with s.get(url + "/view", params={"filename": image["filename"]}) as r:
                assert r.status == 200 and (await r.read()).startswith(b"\x89PNG")
            for params, status in (({"filename": "nope.png"}, 404),
                                   ({"filename": "x.png", "subfolder": "../input"}, 403),
                                   ({"filename": "../a.png"}, 400),
                                   ({"filename": image["filename"], "type": "temp"}, 404)):
                async with s.get(url + "/view", params=params) as r:
                    assert r.status == status, params
            async with s.post(url + "/api/history", json={"delete": [prompt_id]}) as r:
                assert r.status == 200
            async with s.get(url + f"/api/history/{prompt_id}") as r:
                assert await r.json() == {}
            fake.old_server = True
            async with s.post(url + f"/api/jobs/{prompt_id}/cancel") as r:
                assert r.status == 404
    finally:
        await server.close()


def test_template_placeholders(tmp_path: Any) -> None:
    template, _ = load_workflow(WORKFLOW)
    filled = fill(template, {"image": "a.png", "seed": 7, "batch_size": 3, "width": 512,
                             "height": 512, "strength": 0.4, "prompt": "p",
                             "negative_prompt": "n"})
    assert "{{" not in json.dumps(filled)
    assert filled["8"]["inputs"]["seed"] == 7 and filled["2"]["inputs"]["image"] == "a.png"
    assert filled["8"]["inputs"]["denoise"] == 0.4  # the example uses {{strength}}
    bad = tmp_path / "wf.json"
    bad.write_text('{"1": {"class_type": "LoadImage", "inputs": {"image": "fixed.png"}}}')
    with pytest.raises(ValueError, match="placeholder"):
        load_workflow(str(bad))


@pytest.mark.parametrize("fault", FAULT_NAMES)
async def test_fault(gateway_client: Any, fault: str) -> None:
    await run_fault(gateway_client, "comfyui", fault)


def test_upstream_text_is_scrubbed() -> None:
    backend = ComfyUIBackend(NAME, ComfyUIOptions(
        base_url="http://gpu-box:8188", workflow=WORKFLOW, api_key=KEY))
    text = (f"HTTP 401 from http://gpu-box:8188/x?k={KEY}\r\n\x1b[31mkey {KEY} at "
            "gpu-box:8188\u2028" + "x" * 1000)
    clean = backend._scrub(text, 160)
    assert KEY not in clean and "gpu-box" not in clean and "http" not in clean
    assert not any(c in clean for c in "\r\n\x1b\u2028") and len(clean) <= 160
    assert clean.startswith("HTTP 401 from <url> [31mkey <redacted> at <redacted>")


async def test_the_variation_controls_fill_their_placeholders(gateway_client: Any) -> None:
    up, server = await start_upstream(gateway_client, "comfyui", prompt="a cat")
    try:
        answer = await vary(up.client, png_bytes(64, seed=31), n=2, strength=0.7, seed=1234,
                            prompt="autumn colours")
        assert answer.status == 200, answer.body
        assert isinstance(up.fake, ComfyUIFake)
        workflow = list(up.fake.prompts.values())[-1]
        sampler = workflow["8"]["inputs"]
        assert (sampler["denoise"], sampler["seed"]) == (0.7, 1234)
        assert workflow["6"]["inputs"]["text"] == "a cat, autumn colours"
        plain = await vary(up.client, png_bytes(64, seed=32), n=1)
        assert plain.status == 200, plain.body
        assert list(up.fake.prompts.values())[-1]["8"]["inputs"]["denoise"] == 0.55
    finally:
        await server.close()


async def test_a_workflow_without_a_placeholder_does_not_honour_its_control(
        gateway_client: Any, tmp_path: Any) -> None:
    template, _ = load_workflow(WORKFLOW)
    template["8"]["inputs"]["denoise"] = 0.5  # no {{strength}}
    workflow = tmp_path / "fixed-denoise.json"
    workflow.write_text(json.dumps(template), encoding="utf-8")
    up, server = await start_upstream(gateway_client, "comfyui", workflow=str(workflow))
    try:
        answer = await vary(up.client, png_bytes(64, seed=33), n=1, strength=0.7)
        assert answer.status == 400
        assert (answer.body["error"]["param"], answer.body["error"]["code"]) == (
            "strength", "unsupported_parameter")
        assert up.fake.calls("/prompt") == []  # refused before any upstream call
        async with up.client.get("/v1/models/up", headers=auth()) as r:
            assert (await r.json())["controls"] == {"seed": {}, "prompt": {"max_length": 1000}}
    finally:
        await server.close()


def test_the_default_strength_keys_the_pool_only_where_the_workflow_uses_it(
        tmp_path: Any) -> None:
    """Review: the identity (the cache key's backend part) took the default strength for
    every workflow, so an upgrade re-keyed, and charged again, pools of workflows that
    have no {{strength}} to fill."""
    template, _ = load_workflow(WORKFLOW)
    template["8"]["inputs"]["denoise"] = 0.5
    fixed = tmp_path / "fixed-denoise.json"
    fixed.write_text(json.dumps(template), encoding="utf-8")

    def identity(workflow: str, strength: float) -> str:
        return ComfyUIBackend("c", ComfyUIOptions(base_url="http://gpu-box:8188",
                                                  workflow=workflow, strength=strength)
                              ).identity
    assert identity(str(fixed), 0.3) == identity(str(fixed), 0.9)
    assert not identity(str(fixed), 0.3).endswith(":0.3")
    assert identity(WORKFLOW, 0.3) != identity(WORKFLOW, 0.9)
