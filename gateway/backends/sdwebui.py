"""``kind: sdwebui``: Stable Diffusion WebUI (A1111, Forge, SD.Next) ``img2img``.

One call with ``batch_size = n``: WebUI gives image ``i`` of a batch the seed
``seed + i``, so the variations differ and a pool position keeps its seed. Images are
generated at the model's native size and resized, since SD models draw poorly off it.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, ClassVar

from gateway.backends.base import BackendOptions, Generation, VariationRequest
from gateway.backends.http import (
    HttpBackend,
    bad_response,
    batches,
    check_base_url,
    decode_b64,
    strip_userinfo,
    to_pngs,
)


@dataclass(frozen=True)
class SdWebUIOptions(BackendOptions):
    """``username``/``password`` for ``--api-auth``; ``checkpoint`` pins the model via
    ``override_settings`` (else whatever WebUI has loaded, which the cache cannot see)."""

    base_url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    prompt: str = ""
    negative_prompt: str = ""
    denoising_strength: float = 0.55
    steps: int = 20
    cfg_scale: float = 7.0
    sampler_name: str = "Euler a"
    native_size: int = 512
    checkpoint: str | None = None
    max_batch_size: int = 10

    def __post_init__(self) -> None:
        check_base_url(self.base_url)
        if not 0.0 <= self.denoising_strength <= 1.0:
            raise ValueError("denoising_strength must be between 0 and 1")
        if self.native_size < 64 or self.native_size % 8:
            raise ValueError("native_size must be a multiple of 8, at least 64")
        if self.steps < 1 or self.max_batch_size < 1:
            raise ValueError("steps and max_batch_size must be at least 1")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")


class SdWebUIBackend(HttpBackend):
    kind: ClassVar[str] = "sdwebui"
    options_class: ClassVar[type[BackendOptions]] = SdWebUIOptions

    def __init__(self, name: str, options: SdWebUIOptions) -> None:
        super().__init__(name, options.base_url)
        self.options = options

    @property
    def identity(self) -> str:
        o = self.options
        return (f"sdwebui:{strip_userinfo(self.base_url)}:{o.checkpoint or ''}:"
                f"{o.native_size}:{o.denoising_strength:g}:{o.steps}:{o.cfg_scale:g}:"
                f"{o.sampler_name}:{o.prompt}:{o.negative_prompt}")

    def headers(self) -> dict[str, str]:
        headers = super().headers()
        o = self.options
        if o.username is not None and o.password is not None:
            pair = f"{o.username}:{o.password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        return headers

    def payload(self, request: VariationRequest, offset: int, count: int) -> dict[str, Any]:
        o = self.options
        body: dict[str, Any] = {
            "init_images": [base64.b64encode(request.image.png).decode("ascii")],
            "resize_mode": 0,
            "denoising_strength": o.denoising_strength,
            "prompt": o.prompt,
            "negative_prompt": o.negative_prompt,
            "steps": o.steps,
            "cfg_scale": o.cfg_scale,
            "sampler_name": o.sampler_name,
            "width": o.native_size,
            "height": o.native_size,
            "batch_size": count,
            "n_iter": 1,
            "seed": request.seed + offset,
            "send_images": True,
            "save_images": False,
        }
        if o.checkpoint:
            body["override_settings"] = {"sd_model_checkpoint": o.checkpoint}
            body["override_settings_restore_afterwards"] = True
        return body

    async def _img2img(self, request: VariationRequest, offset: int, count: int
                       ) -> list[bytes]:
        payload = await self.request_json("POST", "/sdapi/v1/img2img",
                                          json=self.payload(request, offset, count))
        images = payload.get("images") if isinstance(payload, dict) else None
        if not isinstance(images, list) or len(images) < count:
            raise bad_response(self.name, "fewer images than asked for")
        # Extensions (ControlNet ...) may append extra images after the batch.
        return [decode_b64(self.name, item) for item in images[:count]]

    async def generate(self, request: VariationRequest) -> Generation:
        images: list[bytes] = []
        for offset, count in batches(request.n, self.options.max_batch_size):
            images += await self._img2img(request, offset, count)
        return Generation(await to_pngs(self.name, images, request.size))
