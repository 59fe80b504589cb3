"""``kind: openai_edits``: gpt-image models through ``POST /v1/images/edits``.

dall-e-2 is gone; a variation is now an edit of the source with a prompt asking for a
close variation. gpt-image answers only base64 and only at 1024 px or more, so results
are resized to the requested size; since they are resized anyway, the upstream is asked
for JPEG by default (a tenth of a PNG's bytes, and much cheaper to decode).
``images_per_call`` splits ``n`` for models or accounts that cap ``n`` per call; the calls
run concurrently.

Field facts (openai/openai-openapi ``CreateImageEditRequest``; backends.md): the end
user goes as ``safety_identifier`` (it supersedes ``user``); ``quality`` ``xhigh`` and
``max`` exist on the 2.5 and 2.6 models only, ``complexity`` on 2.6 only; unknown fields
are refused, so optional fields are sent only when the admin set them.

gpt-image takes no seed and no strength. A request's ``strength`` picks one of three
wordings of the prompt (:func:`variation_prompt`: below 1/3 :data:`SUBTLE_PROMPT`, from
2/3 :data:`LOOSE_PROMPT`, between them the configured ``prompt``), and its hint joins
the prompt. A seed cannot be honoured: such a request is refused before it gets here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import aiohttp

from gateway.backends.base import BackendOptions, Controls
from gateway.backends.http import batches, gather_all, strip_userinfo
from gateway.backends.normalise import to_pngs
from gateway.backends.openai import OpenAIAccount, OpenAIEndpoint
from gateway.generation import Generation, TokenUsage, VariationRequest, with_hint

# A model alive on 2026-12-03 with a dated snapshot (gpt-image-2-2026-04-21) and
# published per-image estimates. Models retire on a schedule: the lifecycle watcher
# warns before this one does.
DEFAULT_MODEL = "gpt-image-2"
DEFAULT_PROMPT = ("A close variation of this image: the same subject, composition and "
                  "style, with different details.")
# The wordings a request's strength chooses between (the middle band is ``prompt``).
SUBTLE_PROMPT = ("A very close variation of this image: keep the subject, composition, "
                 "colours and style; change only small details.")
LOOSE_PROMPT = ("A free variation of this image: keep the subject recognisable, but "
                "change the composition, pose, lighting and colours as you see fit.")
DEFAULT_STRENGTH = 0.5  # the middle band: the configured prompt
QUALITIES = ("low", "medium", "high", "auto", "xhigh", "max")
# USD per 1024x1024 image for gpt-image-2: ESTIMATES (gpt-image bills per token), the
# upper end of the published figures in backends.md, so budgets err on the safe side.
# ``auto`` lets the upstream pick, up to ``high``; ``xhigh``/``max`` (2.5/2.6 models
# only) have no published figure: set ``pricing`` or ``token_prices`` for them.
ESTIMATED_PRICES = {"low": 0.02, "medium": 0.07, "high": 0.21, "auto": 0.21,
                    "xhigh": 0.21, "max": 0.21}


@dataclass(frozen=True)
class OpenAIEditsOptions(OpenAIAccount):
    base_url: str = "https://api.openai.com/v1"
    model: str = DEFAULT_MODEL
    prompt: str = DEFAULT_PROMPT
    quality: str = "auto"  # low | medium | high | auto | xhigh | max (2.5/2.6 only)
    complexity: str | None = None  # low | medium | high: gpt-image-2.6 only
    background: str | None = None  # auto | opaque | transparent
    moderation: str | None = None  # auto | low
    # What the upstream encodes its answer as: the gateway re-encodes to PNG at the
    # asked size either way, so jpeg (small, fast to decode) is the default.
    output_format: str = "jpeg"  # png | jpeg | webp
    # 85: past it the JPEG grows fast (604 KB at 100 against 67 KB) and costs the gateway
    # more to decode than it gains after the resize (make bench, the gpt-image rows).
    output_compression: int | None = 85  # 0..100, jpeg and webp only
    upstream_size: str = "1024x1024"  # square: the gateway answers squares
    images_per_call: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model.strip():
            raise ValueError("model must not be empty")
        if self.quality not in QUALITIES:
            raise ValueError(f"quality must be one of {', '.join(QUALITIES)}")
        for name, allowed in (("complexity", ("low", "medium", "high")),
                              ("background", ("auto", "opaque", "transparent")),
                              ("moderation", ("auto", "low"))):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}")
        if self.output_format not in ("png", "jpeg", "webp"):
            raise ValueError("output_format must be one of png, jpeg, webp")
        if self.output_compression is not None and not 0 <= self.output_compression <= 100:
            raise ValueError("output_compression must be between 0 and 100")
        if not self.prompt.strip():
            raise ValueError("prompt must not be empty")
        if not 1 <= self.images_per_call <= 10:
            raise ValueError("images_per_call must be between 1 and 10")

    def default_pricing(self) -> dict[str, float]:
        """Per quality, not per size: the upstream always draws ``upstream_size``."""
        return dict(ESTIMATED_PRICES)

    def price_key(self, size_label: str) -> str:
        return self.quality


def variation_prompt(prompt: str, strength: float | None, hint: str | None) -> str:
    """The prompt sent: the wording ``strength`` picks (``prompt`` when unset or in the
    middle band), with the client's hint joined to it."""
    if strength is not None and strength < 1 / 3:
        prompt = SUBTLE_PROMPT
    elif strength is not None and strength >= 2 / 3:
        prompt = LOOSE_PROMPT
    return with_hint(prompt, hint, " Hint: ")


def usage_of(payload: Any) -> TokenUsage | None:
    """gpt-image's ``usage``: ``input_tokens`` split by ``input_tokens_details`` into
    text and image tokens, and ``output_tokens`` (image output)."""
    usage = payload.get("usage") if isinstance(payload, dict) else None
    if not isinstance(usage, dict):
        return None
    details = usage.get("input_tokens_details")
    details = details if isinstance(details, dict) else {}

    def count(mapping: dict[str, Any], key: str) -> int:
        value = mapping.get(key)
        return value if isinstance(value, int) and value >= 0 else 0

    total_in = count(usage, "input_tokens")
    image_in = count(details, "image_tokens")
    text_in = count(details, "text_tokens") if "text_tokens" in details else max(
        0, total_in - image_in)
    return TokenUsage(text_in, image_in, count(usage, "output_tokens"))


class OpenAIEditsBackend(OpenAIEndpoint[OpenAIEditsOptions]):
    """``POST /images/edits``: ``n`` split into calls of ``images_per_call``."""

    kind: ClassVar[str] = "openai_edits"
    options_class: ClassVar[type[BackendOptions]] = OpenAIEditsOptions

    @property
    def controls(self) -> Controls:
        """Strength (as a wording) and a hint; gpt-image has no seed."""
        return Controls(strength=DEFAULT_STRENGTH, prompt=True)

    @property
    def identity(self) -> str:
        o = self.options
        return (f"openai_edits:{strip_userinfo(self.base_url)}:{o.model}:{o.quality}:"
                f"{o.complexity}:{o.background}:{o.moderation}:{o.upstream_size}:{o.prompt}")

    def form(self, request: VariationRequest, count: int) -> aiohttp.FormData:
        """The multipart body the official SDK would send; optional fields only when set
        (the upstream refuses fields a model does not take)."""
        o = self.options
        form = aiohttp.FormData()
        form.add_field("image", request.image.png, filename="image.png",
                       content_type="image/png")
        fields: dict[str, str | int | None] = {
            "prompt": variation_prompt(o.prompt, request.strength, request.prompt),
            "model": o.model, "n": count, "size": o.upstream_size,
            "quality": o.quality, "complexity": o.complexity, "background": o.background,
            "moderation": o.moderation, "output_format": o.output_format,
            "output_compression": o.output_compression if o.output_format != "png" else None,
            "safety_identifier": request.user,
        }
        for key, value in fields.items():
            if value is not None:
                form.add_field(key, str(value))
        return form

    async def _edit(self, request: VariationRequest, count: int
                    ) -> tuple[list[bytes], TokenUsage | None]:
        payload = await self.request_json("POST", "/images/edits", model=self.options.model,
                                          data=self.form(request, count))
        images = await self.images(payload, count)
        return images, usage_of(payload)

    async def generate(self, request: VariationRequest) -> Generation:
        parts = await gather_all(*(
            self._edit(request, count)
            for _, count in batches(request.n, self.options.images_per_call)))
        images = [image for part, _ in parts for image in part]
        usages = [usage for _, usage in parts if usage is not None]
        total = sum(usages, TokenUsage()) if usages else None
        return Generation(await to_pngs(self.name, images, request.size), total)
