"""The gateway serves a valid OpenAPI 3.1 document that describes its routes."""

from __future__ import annotations

from openapi_spec_validator import validate
from support import auth


async def test_openapi_document_is_valid_and_complete(gateway_client) -> None:
    client = await gateway_client()
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    validate(doc)  # raises on any schema violation of OpenAPI 3.1
    assert doc["openapi"].startswith("3.1")
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    served = set()
    for route in client.app.router.routes():
        if route.method in ("HEAD", "*"):
            continue
        path = route.resource.canonical.replace("{image_id}.png", "{image_id}.png")
        served.add((route.method, path))
    assert served <= documented, f"undocumented routes: {served - documented}"


async def test_variation_request_schema_matches_the_contract(gateway_client) -> None:
    client = await gateway_client()
    doc = await (await client.get("/openapi.json", headers=auth())).json()
    schema = doc["components"]["schemas"]["CreateImageVariationRequest"]
    assert schema["required"] == ["image"]
    props = schema["properties"]
    assert props["n"]["minimum"] == 1 and props["n"]["maximum"] == 10
    assert props["size"]["enum"] == ["256x256", "512x512", "1024x1024"]
    assert props["response_format"]["enum"] == ["url", "b64_json"]
    # The variation controls beyond OpenAI's contract (issue 22).
    assert (props["strength"]["minimum"], props["strength"]["maximum"]) == (0, 1)
    assert props["seed"]["maximum"] == 2**31 - 1 and props["prompt"]["maxLength"] == 1000
    assert "controls" in doc["components"]["schemas"]["Model"]["properties"]
