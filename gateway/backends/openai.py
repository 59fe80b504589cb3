"""``kind: openai``: any server that still speaks ``POST /v1/images/variations``.

Another instance of this gateway, a self-hosted or vendor server. The request is the
multipart form the OpenAI SDK writes (an ``image`` file part, every other field a text
part), sent with the gateway's own upstream key and the HMAC-hashed end user only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import aiohttp

from gateway.backends.base import BackendOptions, VariationRequest
from gateway.backends.http import (
    HttpBackend,
    check_base_url,
    data_items,
    openai_images,
    strip_userinfo,
    to_pngs,
)


@dataclass(frozen=True)
class OpenAIOptions(BackendOptions):
    """``base_url`` ends in ``/v1`` (the SDK's convention); ``response_format`` is what we
    ask the upstream for: both are stored by the gateway either way."""

    base_url: str
    api_key: str = field(default="", repr=False)
    organization: str | None = None
    project: str | None = None
    model: str = "dall-e-2"
    response_format: str = "b64_json"

    def __post_init__(self) -> None:
        check_base_url(self.base_url)
        if self.response_format not in ("url", "b64_json"):
            raise ValueError("response_format must be 'url' or 'b64_json'")


def openai_headers(api_key: str, organization: str | None, project: str | None
                   ) -> dict[str, str]:
    """The auth headers the OpenAI SDK sends (no ``Authorization`` for an empty key)."""
    headers: dict[str, str] = {}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    if organization:
        headers["OpenAI-Organization"] = organization
    if project:
        headers["OpenAI-Project"] = project
    return headers


class OpenAIBackend(HttpBackend):
    kind: ClassVar[str] = "openai"
    options_class: ClassVar[type[BackendOptions]] = OpenAIOptions

    def __init__(self, name: str, options: OpenAIOptions) -> None:
        super().__init__(name, options.base_url)
        self.options = options

    @property
    def identity(self) -> str:
        return f"openai:{strip_userinfo(self.base_url)}:{self.options.model}"

    @property
    def lifecycle_model(self) -> str | None:
        return self.options.model  # OpenAI publishes its shutdown_date (gateway.lifecycle)

    def headers(self) -> dict[str, str]:
        o = self.options
        return {**super().headers(), **openai_headers(o.api_key, o.organization, o.project)}

    async def generate(self, request: VariationRequest) -> list[bytes]:
        form = aiohttp.FormData()
        form.add_field("image", request.image.png, filename="image.png",
                       content_type="image/png")
        form.add_field("model", self.options.model)
        form.add_field("n", str(request.n))
        form.add_field("size", f"{request.size}x{request.size}")
        form.add_field("response_format", self.options.response_format)
        if request.user is not None:
            form.add_field("user", request.user)
        payload = await self.request_json("POST", "/images/variations", data=form)
        images = await openai_images(self, data_items(self.name, payload, request.n))
        return await to_pngs(self.name, images, request.size)
