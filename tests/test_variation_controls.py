"""The variation controls beyond OpenAI's contract (issue 22), through the official SDK.

``strength``, ``seed`` and ``prompt`` are ordinary multipart fields, so the SDK sends
them with ``extra_body``. A seeded request is served from its seed's own pool: the same
upload, settings and seed give the same images again, as a free cache HIT.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from support import TOKENS, GatewayProcess, base_config, png_bytes, start_gateway


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("controls")


@pytest.fixture(scope="module")
def gateway(workdir: Path) -> Iterator[GatewayProcess]:
    g = start_gateway(base_config(workdir), workdir)
    yield g
    g.stop()


def sdk(gateway: GatewayProcess, user: str = "alice") -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=TOKENS[user], max_retries=0)


def vary(gateway: GatewayProcess, image: bytes, user: str = "alice", **extra: Any
         ) -> tuple[list[bytes], str]:
    """The images (decoded b64_json) and the X-Cache header of one SDK call."""
    raw = sdk(gateway, user).images.with_raw_response.create_variation(
        image=("layer.png", image, "image/png"), n=2, size="256x256",
        response_format="b64_json", extra_body=extra)
    parsed = raw.parse()
    return [base64.b64decode(d.b64_json or "") for d in parsed.data], raw.headers["x-cache"]


def images_used(gateway: GatewayProcess, user: str) -> int:
    request = urllib.request.Request(gateway.url + "/v1/usage",
                                     headers={"Authorization": f"Bearer {TOKENS[user]}"})
    with urllib.request.urlopen(request) as r:
        used: int = json.load(r)["limits"]["images_per_day"]["used"]
    return used


def test_same_upload_settings_and_seed_give_the_same_images_free(
        gateway: GatewayProcess) -> None:
    source = png_bytes(128, seed=11)
    first, status = vary(gateway, source, user="bob", strength=0.3, seed=1234)
    assert status == "MISS" and len(set(first)) == 2  # seed, seed + 1: two images
    charged = images_used(gateway, "bob")
    again, status = vary(gateway, source, user="bob", strength=0.3, seed=1234)
    assert again == first  # byte-identical
    assert status == "HIT" and images_used(gateway, "bob") == charged  # free
    # The unseeded pool, and another seed, are other images.
    plain, _ = vary(gateway, source, user="bob", strength=0.3)
    other_seed, _ = vary(gateway, source, user="bob", strength=0.3, seed=1235)
    assert not set(plain) & set(first)
    assert other_seed[0] == first[1]  # seed 1235 is what seed 1234 drew second


def test_a_different_strength_gives_different_images(gateway: GatewayProcess) -> None:
    source = png_bytes(128, seed=12)
    gentle, _ = vary(gateway, source, strength=0.1, seed=99)
    wild, status = vary(gateway, source, strength=0.9, seed=99)
    assert status == "MISS"  # the key holds the strength
    assert not set(gentle) & set(wild)


@pytest.mark.parametrize(("extra", "param", "code"), [
    ({"strength": 1.5}, "strength", "decimal_above_max_value"),
    ({"strength": -0.1}, "strength", "decimal_below_min_value"),
    ({"strength": "lots"}, "strength", "invalid_type"),
    ({"strength": "nan"}, "strength", "invalid_type"),
    ({"seed": "x"}, "seed", "invalid_type"),
    ({"seed": 1.5}, "seed", "invalid_type"),
    ({"seed": -1}, "seed", "integer_below_min_value"),
    ({"seed": 2**31}, "seed", "integer_above_max_value"),
    ({"prompt": "a" * 1001}, "prompt", "string_above_max_length"),
    ({"prompt": "autumn\ncolours"}, "prompt", "invalid_value"),
    # The procedural backend reads no text: a hint it cannot honour is refused.
    ({"prompt": "autumn colours"}, "prompt", "unsupported_parameter"),
], ids=lambda v: str(v)[:30])
def test_bad_values_get_the_envelope_with_their_param(
        gateway: GatewayProcess, extra: dict[str, Any], param: str, code: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        vary(gateway, png_bytes(64), **extra)
    err = info.value
    assert err.param == param and err.code == code
    assert set(err.response.json()["error"]) == {"message", "type", "param", "code"}
    assert err.response.headers["x-should-retry"] == "false"


def test_models_list_the_controls_the_route_honours(gateway: GatewayProcess) -> None:
    models = {m.id: m.model_dump() for m in sdk(gateway).models.list()}
    # procedural: its strength (default 0.5) and seed, no hint
    expected = {"strength": {"default": 0.5}, "seed": {}}
    assert models["dall-e-2"]["controls"] == expected
    assert models["local"]["controls"] == expected


def test_audit_records_the_three_values(gateway: GatewayProcess, workdir: Path) -> None:
    vary(gateway, png_bytes(64, seed=13), strength=0.25, seed=7)
    with pytest.raises(openai.BadRequestError):
        vary(gateway, png_bytes(64, seed=13), strength=0.25, seed=7, prompt="a fox")
    db = sqlite3.connect(workdir / "audit.sqlite3")
    try:
        rows = db.execute("SELECT strength, seed, prompt, status FROM audit WHERE seed = 7 "
                          "ORDER BY id").fetchall()
    finally:
        db.close()
    assert rows == [(0.25, 7, None, 200), (0.25, 7, "a fox", 400)]


def test_metrics_count_requests_using_each_control(gateway: GatewayProcess) -> None:
    def counts() -> dict[str, float]:
        with urllib.request.urlopen(gateway.url + "/metrics") as r:
            text = r.read().decode()
        return {line.split('"')[1]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("variations_gateway_variation_controls_total{")}
    before = counts()
    vary(gateway, png_bytes(64, seed=14), seed=5)
    after = counts()
    assert after["seed"] == before["seed"] + 1
    assert after["strength"] == before["strength"] and after["prompt"] == before["prompt"]


def test_strict_contract_refuses_them(tmp_path: Path) -> None:
    g = start_gateway(base_config(tmp_path, api={"strict_contract": True}), tmp_path)
    try:
        for extra in ({"strength": 0.4}, {"seed": 3}, {"prompt": "x"}):
            with pytest.raises(openai.BadRequestError) as info:
                vary(g, png_bytes(64), **extra)
            assert info.value.code == "unknown_parameter"
            assert info.value.param == next(iter(extra))
        plain, _ = vary(g, png_bytes(64))  # exactly OpenAI's contract still works
        assert len(plain) == 2
        models = {m.id: m.model_dump() for m in sdk(g).models.list()}
        assert models["dall-e-2"]["controls"] == {}
    finally:
        g.stop()
