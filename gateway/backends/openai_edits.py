"""``kind: openai_edits``: gpt-image models through ``POST /v1/images/edits``.

dall-e-2 is gone; a variation is now an edit of the source with a prompt asking for a
close variation. gpt-image answers only base64 and only at 1024 px or more, so results
are resized to the requested size. ``images_per_call`` splits ``n`` for models or
accounts that cap ``n`` per call; the calls run concurrently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import aiohttp

from gateway.backends.base import BackendOptions, VariationRequest
from gateway.backends.http import (
    HttpBackend,
    batches,
    check_base_url,
    data_items,
    gather_all,
    openai_images,
    strip_userinfo,
    to_pngs,
)
from gateway.backends.openai import openai_headers

DEFAULT_PROMPT = ("A close variation of this image: the same subject, composition and "
                  "style, with different details.")


@dataclass(frozen=True)
class OpenAIEditsOptions(BackendOptions):
    base_url: str = "https://api.openai.com/v1"
    api_key: str = field(default="", repr=False)
    organization: str | None = None
    project: str | None = None
    model: str = "gpt-image-1-mini"
    prompt: str = DEFAULT_PROMPT
    quality: str = "auto"  # low | medium | high | auto
    upstream_size: str = "1024x1024"  # square: the gateway answers squares
    images_per_call: int = 10

    def __post_init__(self) -> None:
        check_base_url(self.base_url)
        if self.quality not in ("low", "medium", "high", "auto"):
            raise ValueError("quality must be one of low, medium, high, auto")
        if not self.prompt.strip():
            raise ValueError("prompt must not be empty")
        if not 1 <= self.images_per_call <= 10:
            raise ValueError("images_per_call must be between 1 and 10")


class OpenAIEditsBackend(HttpBackend):
    kind: ClassVar[str] = "openai_edits"
    options_class: ClassVar[type[BackendOptions]] = OpenAIEditsOptions

    def __init__(self, name: str, options: OpenAIEditsOptions) -> None:
        super().__init__(name, options.base_url)
        self.options = options

    @property
    def identity(self) -> str:
        o = self.options
        return (f"openai_edits:{strip_userinfo(self.base_url)}:{o.model}:{o.quality}:"
                f"{o.upstream_size}:{o.prompt}")

    @property
    def lifecycle_model(self) -> str | None:
        return self.options.model  # OpenAI publishes its shutdown_date (gateway.lifecycle)

    def headers(self) -> dict[str, str]:
        o = self.options
        return {**super().headers(), **openai_headers(o.api_key, o.organization, o.project)}

    async def _edit(self, request: VariationRequest, count: int) -> list[bytes]:
        o = self.options
        form = aiohttp.FormData()
        form.add_field("image", request.image.png, filename="image.png",
                       content_type="image/png")
        form.add_field("prompt", o.prompt)
        form.add_field("model", o.model)
        form.add_field("n", str(count))
        form.add_field("size", o.upstream_size)
        form.add_field("quality", o.quality)
        if request.user is not None:
            form.add_field("user", request.user)
        payload = await self.request_json("POST", "/images/edits", data=form)
        return await openai_images(self, data_items(self.name, payload, count))

    async def generate(self, request: VariationRequest) -> list[bytes]:
        parts = await gather_all(*(
            self._edit(request, count)
            for _, count in batches(request.n, self.options.images_per_call)))
        images = [image for part in parts for image in part]
        return await to_pngs(self.name, images, request.size)
