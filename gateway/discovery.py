"""What a client finds when it looks around: ``GET /`` and OpenAI's ``GET /v1/models``.

OpenAI-compatible tools probe ``/v1/models`` (with the member's token) before they let a
user pick a model, and a person pointing a browser at the gateway gets a short index
instead of a 404. Each model lists the variation ``controls`` (``strength``, ``seed``,
``prompt``) its route honours, so a client (the GIMP plug-in) can offer only those.
"""

from __future__ import annotations

from aiohttp import web

from gateway import __version__
from gateway.errors import ApiError
from gateway.keys import AUDIT_RECORD, AUTH, CONFIG, ROUTER
from gateway.upload import DEFAULT_MODEL

# What OpenAI's ``GET /v1/models`` says of dall-e-2 (``created``, ``owned_by``).
_DALL_E_2 = {"id": DEFAULT_MODEL, "object": "model", "created": 1698798177,
             "owned_by": "system"}
OWNER = "variations-gateway"


def _models(request: web.Request) -> list[dict[str, object]]:
    """``dall-e-2`` (the route) first, then each configured backend by name (a request's
    ``model`` may name one to skip the route)."""
    principal = request.app[AUTH].member(request)  # OpenAI answers 401 without a key
    request[AUDIT_RECORD].member = principal.name
    router, strict = request.app[ROUTER], request.app[CONFIG].api.strict_contract

    def controls(model: str) -> dict[str, dict[str, object]]:
        # strict_contract refuses every control: none is offered.
        return {} if strict else router.controls(model).described()

    backends = [{"id": b.name, "object": "model", "created": 0, "owned_by": OWNER,
                 "controls": controls(b.name)}
                for b in request.app[CONFIG].backends if b.name != DEFAULT_MODEL]
    return [{**_DALL_E_2, "controls": controls(DEFAULT_MODEL)}, *backends]


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models`` in OpenAI's list format."""
    return web.json_response({"object": "list", "data": _models(request)})


async def get_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{model}``: one entry, or OpenAI's ``model_not_found``."""
    wanted = request.match_info["model"]
    for model in _models(request):
        if model["id"] == wanted:
            return web.json_response(model)
    shown = wanted[:64].encode("unicode_escape").decode("ascii")
    raise ApiError(404, f"The model '{shown}' does not exist or you do not have access "
                   "to it.", code="model_not_found", param="model")


async def index(request: web.Request) -> web.Response:
    """``GET /``: what this server is and where to go; nothing about its config."""
    return web.json_response({
        "object": "service",
        "name": OWNER,
        "version": __version__,
        "description": "OpenAI-compatible image variations (POST /v1/images/variations).",
        "endpoints": {
            "variations": "POST /v1/images/variations",
            "models": "GET /v1/models",
            "usage": "GET /v1/usage",
            "health": "GET /healthz",
            "ready": "GET /readyz",
            "openapi": "GET /openapi.json",
        },
    })
