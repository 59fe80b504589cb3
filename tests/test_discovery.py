"""What a new client finds (issue 19, item 17): ``GET /``, ``GET /v1/models`` in OpenAI's
list format, and ``/admin/audit`` refusing a parameter it does not know."""

from __future__ import annotations

from typing import Any

from support import ADMIN_TOKEN, auth

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
BACKENDS = [{"name": "local", "kind": "procedural", "executor": "thread"},
            {"name": "spare", "kind": "procedural", "executor": "thread"}]


async def test_models_lists_dall_e_2_and_the_backends(gateway_client: Any) -> None:
    """OpenAI-compatible tools probe GET /v1/models with their key (OpenAI's list
    format: object "list", data of {id, object "model", created, owned_by})."""
    client = await gateway_client(backends=BACKENDS, route=["local", "spare"])
    async with client.get("/v1/models", headers=auth()) as r:
        assert r.status == 200
        body = await r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["dall-e-2", "local", "spare"]
    for model in body["data"]:
        assert model["object"] == "model"
        assert isinstance(model["created"], int) and isinstance(model["owned_by"], str)
    async with client.get("/v1/models/spare", headers=auth()) as r:
        assert r.status == 200 and (await r.json())["id"] == "spare"
    async with client.get("/v1/models/gpt-4", headers=auth()) as r:
        assert r.status == 404
        assert (await r.json())["error"]["code"] == "model_not_found"


async def test_models_needs_a_member_token(gateway_client: Any) -> None:
    client = await gateway_client()
    async with client.get("/v1/models") as r:
        assert r.status == 401
        assert "error" in await r.json()


async def test_root_answers_a_short_json_index(gateway_client: Any) -> None:
    client = await gateway_client()
    async with client.get("/") as r:
        assert r.status == 200
        body = await r.json()
    assert body["name"] == "variations-gateway"
    assert body["endpoints"]["variations"] == "POST /v1/images/variations"
    assert body["endpoints"]["models"] == "GET /v1/models"
    assert "local" not in str(body)  # no config details for whoever asks


async def test_admin_audit_refuses_an_unknown_parameter(gateway_client: Any) -> None:
    """A misspelt filter (?member=bob for ?user=bob) used to return everyone's rows."""
    client = await gateway_client()
    async with client.get("/admin/audit", headers=ADMIN, params={"member": "bob"}) as r:
        assert r.status == 400
        error = (await r.json())["error"]
    assert error["param"] == "member" and error["code"] == "unknown_parameter"
    assert error["type"] == "invalid_request_error" and "member" in error["message"]
    async with client.get("/admin/audit", headers=ADMIN, params={"user": "bob"}) as r:
        assert r.status == 200


async def test_models_list_the_controls_their_route_honours(gateway_client: Any) -> None:
    """A route honours a control only if every backend in it does (a fallback could
    answer); its default strength is the first backend's. No upstream is called."""
    gpt_image = {"name": "gpt-image", "kind": "openai_edits",
                 "base_url": "http://127.0.0.1:9/v1", "api_key": "sk-unused"}
    local = {"name": "local", "kind": "procedural", "executor": "thread", "strength": 0.3}
    client = await gateway_client(backends=[local, gpt_image], route=["local", "gpt-image"])
    async with client.get("/v1/models", headers=auth()) as r:
        controls = {m["id"]: m["controls"] for m in (await r.json())["data"]}
    assert controls == {
        "dall-e-2": {"strength": {"default": 0.3}},
        "local": {"strength": {"default": 0.3}, "seed": {}},
        "gpt-image": {"strength": {"default": 0.5}, "prompt": {"max_length": 1000}},
    }
    async with client.get("/v1/models/gpt-image", headers=auth()) as r:
        assert (await r.json())["controls"] == controls["gpt-image"]
