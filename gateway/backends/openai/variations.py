"""``kind: openai``: any server that still speaks ``POST /v1/images/variations``.

Xinference, AMD Lemonade, another instance of this gateway. OpenAI itself stopped
serving the route with dall-e-2 (2026-05-12), so there is no default ``model``: these
servers want one of their own model names (Xinference: the UID of a launched model).
The request is the multipart form the OpenAI SDK writes (an ``image`` file part, every
other field a text part), sent with the gateway's own upstream key and the HMAC-hashed
end user only. ``b64_json`` is always asked for: Xinference answers ``url`` with a path
on its own disk, and Lemonade answers base64 whatever is asked. Xinference's img2img
pipelines refuse a missing ``prompt``, so one is always sent; ``extra`` goes as its
``kwargs`` JSON (xorbitsai/inference ``restful_api.py`` ``create_variations``).

A request's variation controls go as ``send_controls`` says: ``kwargs`` (Xinference:
``strength`` and ``seed`` join the ``kwargs`` JSON, the hint is appended to ``prompt``),
``fields`` (another instance of this gateway: its own ``strength``/``seed``/``prompt``
fields), or ``none`` (an upstream that takes neither, e.g. Lemonade: none honoured).
A request that sets no control is sent exactly as before controls existed (no seed,
no extra field), so a config written for an upstream that refuses unknown fields keeps
working, and its pooled images keep their cache key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import aiohttp

from gateway.backends.base import BackendOptions, Controls
from gateway.backends.http import strip_userinfo
from gateway.backends.normalise import to_pngs
from gateway.backends.openai import OpenAIAccount, OpenAIEndpoint
from gateway.generation import Generation, VariationRequest, with_hint

DEFAULT_PROMPT = "A variation of this image."
# diffusers' img2img pipelines (what Xinference runs) default to strength 0.8.
PIPELINE_STRENGTH = 0.8
MODEL_REQUIRED = (
    "model is required: the upstream expects one of its own model names (Xinference: "
    "the UID of a model launched on it; Lemonade: a model it lists; another gateway: "
    "dall-e-2 or one of its backend names)")


@dataclass(frozen=True)
class OpenAIOptions(OpenAIAccount):
    """``base_url`` ends in ``/v1`` (the SDK's convention); ``model`` is required."""

    # Xinference's img2img pipelines need a prompt; null for an upstream that refuses
    # the field (another instance of this gateway refuses fields beyond the contract).
    prompt: str | None = DEFAULT_PROMPT
    negative_prompt: str | None = None
    # Extra pipeline arguments, sent as Xinference's ``kwargs`` JSON (e.g. strength).
    extra: Mapping[str, Any] = field(default_factory=dict)
    # How a request's strength, seed and hint reach the upstream (see the module).
    send_controls: Literal["kwargs", "fields", "none"] = "kwargs"
    # The strength the upstream uses when none is sent (``extra.strength`` if set).
    default_strength: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model.strip():
            raise ValueError(MODEL_REQUIRED)
        if self.default_strength is not None and not 0.0 <= self.default_strength <= 1.0:
            raise ValueError("default_strength must be between 0 and 1")


class OpenAIBackend(OpenAIEndpoint[OpenAIOptions]):
    """``POST /images/variations``: one call for all ``n`` images."""

    kind: ClassVar[str] = "openai"
    options_class: ClassVar[type[BackendOptions]] = OpenAIOptions

    @property
    def controls(self) -> Controls:
        o = self.options
        if o.send_controls == "none":
            return Controls()
        default = o.default_strength
        if default is None:
            configured = o.extra.get("strength")
            default = float(configured) if isinstance(configured, int | float) and \
                not isinstance(configured, bool) and 0 <= configured <= 1 \
                else PIPELINE_STRENGTH
        return Controls(strength=default, seed=True, prompt=True)

    @property
    def identity(self) -> str:
        o = self.options
        extra = json.dumps(dict(o.extra), sort_keys=True)
        # Unchanged for the default send_controls: a request without controls is
        # sent as before, so the images pooled before controls existed stay valid.
        how = "" if o.send_controls == "kwargs" else f":{o.send_controls}"
        return (f"openai:{strip_userinfo(self.base_url)}:{o.model}:{o.prompt}:"
                f"{o.negative_prompt}:{extra}{how}")

    def form(self, request: VariationRequest) -> aiohttp.FormData:
        o = self.options
        form = aiohttp.FormData()
        form.add_field("image", request.image.png, filename="image.png",
                       content_type="image/png")
        form.add_field("model", o.model)
        # "fields": another gateway's ``prompt`` is the hint alone (_add_controls).
        prompt = "" if o.send_controls == "fields" else o.prompt or ""
        if o.send_controls == "kwargs":
            prompt = with_hint(prompt, request.prompt)
        if prompt:
            form.add_field("prompt", prompt)
        if o.negative_prompt:
            form.add_field("negative_prompt", o.negative_prompt)
        form.add_field("n", str(request.n))
        form.add_field("size", f"{request.size}x{request.size}")
        form.add_field("response_format", "b64_json")
        kwargs = dict(o.extra)
        if o.send_controls == "kwargs":
            # The pool position's seed, when the client chose one, or in place of a
            # configured one (which would give every image of the pool the same seed).
            if request.seeded or "seed" in kwargs:
                kwargs["seed"] = request.seed
            if request.strength is not None:  # with or without a seed
                kwargs["strength"] = request.strength
        if kwargs:
            form.add_field("kwargs", json.dumps(kwargs))
        if request.user is not None:
            form.add_field("user", request.user)
        if o.send_controls == "fields":
            self._add_controls(form, request)
        return form

    @staticmethod
    def _add_controls(form: aiohttp.FormData, request: VariationRequest) -> None:
        """Another gateway's own fields (its ``prompt`` is the hint, not a prompt)."""
        if request.seeded:
            form.add_field("seed", str(request.seed))
        if request.strength is not None:
            form.add_field("strength", f"{request.strength:g}")
        if request.prompt:
            form.add_field("prompt", request.prompt)

    async def generate(self, request: VariationRequest) -> Generation:
        payload = await self.request_json("POST", "/images/variations", model=self.model,
                                          data=self.form(request))
        images = await self.images(payload, request.n)
        return Generation(await to_pngs(self.name, images, request.size))
