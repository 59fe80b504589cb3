"""``kind: openai``: servers that still speak ``/v1/images/variations``.

The shared matrix runs against a Xinference-shaped fake (the default of
``upstream_cases.make_fake``), then the Lemonade-shaped one and another instance of this
gateway's contract (strict: no fields beyond OpenAI's).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fakes_upstreams import LemonadeFake, OpenAIVariationsFake, Recorded, XinferenceFake
from instrumented_backend import vary
from support import png_bytes
from upstream_cases import (
    FAULT_NAMES,
    KEY,
    MATRIX,
    XINFERENCE_MODEL,
    assert_hashed_user,
    backend_entry,
    run_fault,
    sdk_matrix,
    serve_fake,
    start_upstream,
)

from gateway.backends.openai.variations import DEFAULT_PROMPT, MODEL_REQUIRED
from gateway.config import ConfigError, parse_config


async def test_xinference_every_size_format_and_n(gateway_client: Any) -> None:
    up, server = await start_upstream(gateway_client, "openai", organization="org-art",
                                      project="proj-1", negative_prompt="blurry",
                                      extra={"strength": 0.6, "seed": 7}, **MATRIX)

    def check(calls: list[Recorded], n: int, size: int) -> None:
        assert len(calls) == 1
        c = calls[0]
        assert c.headers["Authorization"] == f"Bearer {KEY}"
        assert c.headers["OpenAI-Organization"] == "org-art"
        assert c.headers["OpenAI-Project"] == "proj-1"
        assert c.headers["Content-Type"].startswith("multipart/form-data; boundary=")
        _, content_type, body = c.files["image"]
        assert content_type == "image/png" and body.startswith(b"\x89PNG")
        assert set(c.fields) == {"model", "prompt", "negative_prompt", "n", "size",
                                 "response_format", "kwargs", "user"}
        assert c.fields["model"] == XINFERENCE_MODEL and c.fields["n"] == str(n)
        assert c.fields["prompt"] == DEFAULT_PROMPT
        assert c.fields["negative_prompt"] == "blurry"
        kwargs = json.loads(c.fields["kwargs"])
        # The pool position's seed replaces a configured one (else every image of the
        # pool would share it).
        assert kwargs["strength"] == 0.6 and isinstance(kwargs["seed"], int)
        assert kwargs["seed"] != 7 and set(kwargs) == {"strength", "seed"}
        assert c.fields["size"] == f"{size}x{size}"
        assert c.fields["response_format"] == "b64_json"  # url would be a server path
        assert_hashed_user(c.fields["user"])

    try:
        await sdk_matrix(up, check)
    finally:
        await server.close()


async def test_xinference_jpeg_answers_are_stored_as_png(gateway_client: Any) -> None:
    fake = XinferenceFake(KEY, models=(XINFERENCE_MODEL,), image_format="JPEG")
    up, server = await start_upstream(gateway_client, "openai", fake=fake)
    try:
        answer = await vary(up.client, png_bytes(64, seed=2), n=2, size="512x512")
        assert answer.status == 200, answer.body
    finally:
        await server.close()


async def test_a_server_path_for_a_url_is_a_plain_bad_response(gateway_client: Any) -> None:
    """Xinference answers ``response_format=url`` with a path on its own disk: should a
    server send one although b64_json was asked for, the gateway says so."""
    fake = XinferenceFake(KEY, models=(XINFERENCE_MODEL,))
    fake.always_paths = True
    up, server = await start_upstream(gateway_client, "openai", fake=fake)
    try:
        answer = await vary(up.client, png_bytes(64), n=1)
        assert answer.status == 502
        assert answer.body["error"]["code"] == "upstream_bad_response"
        assert "not an http(s) URL" in answer.body["error"]["message"]
    finally:
        await server.close()


async def test_lemonade_every_size_format_and_n(gateway_client: Any) -> None:
    fake = LemonadeFake(KEY, models=("SD-Turbo",))
    up, server = await start_upstream(gateway_client, "openai", fake=fake, model="SD-Turbo",
                                      **MATRIX)

    def check(calls: list[Recorded], n: int, size: int) -> None:
        assert len(calls) == 1
        c = calls[0]
        assert c.fields["model"] == "SD-Turbo" and c.fields["n"] == str(n)
        assert c.fields["prompt"] == DEFAULT_PROMPT  # ignored where a model takes none
        assert c.fields["size"] == f"{size}x{size}"
        assert_hashed_user(c.fields["user"])

    try:
        await sdk_matrix(up, check)
    finally:
        await server.close()


async def test_another_gateway_with_prompt_off(gateway_client: Any) -> None:
    """Another instance of this gateway (with ``api.strict_contract``) refuses fields
    beyond OpenAI's contract: ``prompt: null`` and ``send_controls: none`` send none."""
    up, server = await start_upstream(gateway_client, "openai", fake=OpenAIVariationsFake(KEY),
                                      model="dall-e-2", prompt=None, send_controls="none")
    try:
        answer = await vary(up.client, png_bytes(64, seed=3), n=3, size="512x512")
        assert answer.status == 200, answer.body
        assert set(up.fake.calls()[0].fields) == {"model", "n", "size", "response_format"}
    finally:
        await server.close()


@pytest.mark.parametrize("fake_kind", ["xinference", "lemonade"])
async def test_an_unknown_model_is_retired_and_the_route_falls_back(
        gateway_client: Any, fake_kind: str) -> None:
    fake = (XinferenceFake(KEY, models=("other",)) if fake_kind == "xinference"
            else LemonadeFake(KEY, models=("other",)))
    server, url = await serve_fake(fake)
    try:
        entry = backend_entry("openai", url)
        client = await gateway_client(
            backends=[entry, {"name": "local", "kind": "procedural", "executor": "thread"}],
            route=["up", "local"])
        answer = await vary(client, png_bytes(64, seed=5), n=1)
        assert answer.status == 200, answer.body  # served by the fallback
        pinned = await vary(client, png_bytes(64, seed=6), n=1, model="up")
        assert pinned.status == 502
        error = pinned.body["error"]
        assert error["code"] == "upstream_model_retired"
        assert XINFERENCE_MODEL in error["message"] and "'up'" in error["message"]
        assert url not in error["message"] and KEY not in error["message"]
        assert pinned.headers["x-should-retry"] == "false"
        assert len(fake.calls()) == 2  # never retried against the same backend
    finally:
        await server.close()


def test_check_config_refuses_an_openai_backend_without_a_model() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("backends:\n  - {name: x, kind: openai, base_url: 'http://x/v1'}\n",
                     env={})
    assert MODEL_REQUIRED in str(info.value) and "Xinference" in str(info.value)
    assert "backends[0]" in str(info.value)


@pytest.mark.parametrize("fault", FAULT_NAMES)
async def test_fault(gateway_client: Any, fault: str) -> None:
    await run_fault(gateway_client, "openai", fault)


@pytest.mark.parametrize("fault", FAULT_NAMES)
async def test_fault_lemonade(gateway_client: Any, fault: str) -> None:
    await run_fault(gateway_client, "openai", fault, fake=LemonadeFake(KEY, models=("SD-Turbo",)),
                    model="SD-Turbo")


async def test_a_key_ending_in_a_newline_still_authenticates(gateway_client: Any) -> None:
    """A key from a secret file (trailing newline) once made every request a 500."""
    up, server = await start_upstream(gateway_client, "openai", key=KEY + "\n")
    try:
        answer = await vary(up.client, png_bytes(64), n=1)
        assert answer.status == 200, answer.body
        assert up.fake.calls()[0].headers["Authorization"] == f"Bearer {KEY}"
    finally:
        await server.close()


async def test_xinference_gets_the_controls_in_kwargs(gateway_client: Any) -> None:
    up, server = await start_upstream(gateway_client, "openai", extra={"guidance_scale": 6})
    try:
        answer = await vary(up.client, png_bytes(64, seed=51), n=2, strength=0.7, seed=1234,
                            prompt="autumn colours")
        assert answer.status == 200, answer.body
        call = up.fake.calls()[-1]
        assert json.loads(call.fields["kwargs"]) == {"guidance_scale": 6, "strength": 0.7,
                                                     "seed": 1234}
        assert call.fields["prompt"] == f"{DEFAULT_PROMPT}, autumn colours"
        # Strength alone (no seed) reaches the pipeline too (review: it was sent only
        # beside a seed, so such a request ran, and was charged, at the default).
        answer = await vary(up.client, png_bytes(64, seed=53), n=1, strength=0.3)
        assert answer.status == 200, answer.body
        assert json.loads(up.fake.calls()[-1].fields["kwargs"]) == {"guidance_scale": 6,
                                                                   "strength": 0.3}
    finally:
        await server.close()


async def test_another_gateway_gets_the_controls_as_its_own_fields(
        gateway_client: Any) -> None:
    up, server = await start_upstream(gateway_client, "openai", fake=OpenAIVariationsFake(
        KEY, extra_fields=("strength", "seed", "prompt")), model="dall-e-2", prompt=None,
        send_controls="fields")
    try:
        answer = await vary(up.client, png_bytes(64, seed=52), n=2, strength=0.7, seed=1234,
                            prompt="autumn colours")
        assert answer.status == 200, answer.body
        fields = up.fake.calls()[-1].fields
        assert (fields["strength"], fields["seed"], fields["prompt"]) == (
            "0.7", "1234", "autumn colours")
        assert "kwargs" not in fields
    finally:
        await server.close()


async def test_with_send_controls_none_no_control_is_honoured(gateway_client: Any) -> None:
    up, server = await start_upstream(gateway_client, "openai", fake=OpenAIVariationsFake(KEY),
                                      model="dall-e-2", prompt=None, send_controls="none")
    try:
        for name, value in (("strength", 0.5), ("seed", 3), ("prompt", "x")):
            answer = await vary(up.client, png_bytes(64, seed=53), n=1, **{name: value})
            assert answer.status == 400 and answer.body["error"]["param"] == name
        assert up.fake.calls() == []
    finally:
        await server.close()


async def test_a_request_without_controls_is_sent_as_before_controls(
        gateway_client: Any) -> None:
    # Another gateway (strict: it refuses fields beyond OpenAI's contract) configured
    # before controls existed, with the default send_controls: a plain request must not
    # gain a `kwargs` field, or every request of an upgraded config would get a 400.
    up, server = await start_upstream(gateway_client, "openai", fake=OpenAIVariationsFake(KEY),
                                      model="dall-e-2", prompt=None)
    try:
        answer = await vary(up.client, png_bytes(64, seed=54), n=2)
        assert answer.status == 200, answer.body
        assert "kwargs" not in up.fake.calls()[-1].fields
    finally:
        await server.close()
