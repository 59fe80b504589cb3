"""``kind: sdwebui``: Stable Diffusion WebUI (A1111, Forge, SD.Next) ``img2img``.

One call with ``batch_size = n``: WebUI gives image ``i`` of a batch the seed
``seed + i``, so the variations differ and a pool position keeps its seed. A request's
``strength`` is sent as ``denoising_strength`` and its hint is appended to ``prompt``. Images are
generated at the model's native size and resized, since SD models draw poorly off it.

A configured ``checkpoint`` is sent as ``override_settings.sd_model_checkpoint``, which
WebUI silently ignores when the name is not one of its checkpoint aliases: it then draws
with whatever model is loaded (A1111 ``modules/processing.py``, ``process_images``). The
cache key holds the configured checkpoint, so those images would be stored under the
wrong model. The response's ``info`` names the model actually used (``sd_model_name``,
``sd_model_hash``); a mismatch is the upstream's failure and nothing is stored.
"""

from __future__ import annotations

import base64
import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import structlog

from gateway.backends.base import BackendError, BackendOptions, Controls, bad_response
from gateway.backends.http import HttpBackend, HttpOptions, batches, decode_b64, strip_userinfo
from gateway.backends.normalise import to_pngs
from gateway.generation import Generation, VariationRequest, with_hint

log = structlog.get_logger("gateway.backends.sdwebui")

# Checkpoint file extensions WebUI lists (A1111 modules/sd_models.py, list_models).
_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf")
# "name.safetensors [31e35c80fc]": a title, as /sdapi/v1/sd-models lists it.
_TITLE = re.compile(r"^(?P<name>.*?)\s*\[(?P<hash>[0-9a-fA-F]{8,64})\]$")
_HASH = re.compile(r"^[0-9a-fA-F]{8,64}$")
# Hashes shorter than this are not compared by prefix (the old 8-digit model hash is
# not a sha256 prefix, so only an exact match counts).
_SHORTHASH = 10
_SHOWN = re.compile(r"[^A-Za-z0-9._\-+ \[\]()]")


class ModelId(NamedTuple):
    """A checkpoint reduced to what WebUI reports: the file's stem and a hash."""

    name: str | None  # lower-cased basename without extension
    hash: str | None  # lower-case hex: old 8-digit hash, 10-digit shorthash or sha256


def model_id(name: str | None, model_hash: str | None = None) -> ModelId:
    """Normalise a checkpoint as configured or as ``info`` names it.

    Accepts a title (``sd_xl_base_1.0.safetensors [31e35c80fc]``), a file name with or
    without extension or sub-folder, or a bare hash. ``info``'s ``sd_model_name`` is
    the basename without extension (A1111 ``CheckpointInfo.name_for_extra``), so that is
    the form both sides are reduced to.
    """
    stem: str | None = None
    digest = model_hash.strip().lower() if isinstance(model_hash, str) and \
        _HASH.match(model_hash.strip()) else None
    if isinstance(name, str) and name.strip():
        text = name.strip()
        if (m := _TITLE.match(text)) is not None:
            text, digest = m["name"], digest or m["hash"].lower()
        if _HASH.match(text) and digest is None:
            return ModelId(None, text.lower())  # a bare hash is an alias, not a file
        text = re.split(r"[\\/]", text)[-1]
        for ext in _EXTENSIONS:
            if text.lower().endswith(ext):
                text = text[: -len(ext)]
                break
        stem = text.lower() or None
    return ModelId(stem, digest)


def _hashes_match(a: str, b: str) -> bool:
    if min(len(a), len(b)) < _SHORTHASH:
        return a == b
    return a.startswith(b) or b.startswith(a)


def same_model(configured: ModelId, used: ModelId) -> bool | None:
    """``True``/``False``, or ``None`` when nothing the two share can be compared.

    A match by name or by hash is enough: the hash may be missing (``--no-hashing``) or
    of another kind (old 8-digit hash vs sha256), and a renamed file keeps its hash.
    """
    comparable = False
    if configured.name and used.name:
        comparable = True
        if configured.name == used.name:
            return True
    if configured.hash and used.hash:
        comparable = True
        if _hashes_match(configured.hash, used.hash):
            return True
    return False if comparable else None


def _shown(value: str) -> str:
    """An upstream-provided model name, safe for a client message: short, plain."""
    return _SHOWN.sub("?", value)[:80]


@dataclass(frozen=True)
class SdWebUIOptions(HttpOptions):
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
        super().__post_init__()
        if not 0.0 <= self.denoising_strength <= 1.0:
            raise ValueError("denoising_strength must be between 0 and 1")
        if self.native_size < 64 or self.native_size % 8:
            raise ValueError("native_size must be a multiple of 8, at least 64")
        if self.steps < 1 or self.max_batch_size < 1:
            raise ValueError("steps and max_batch_size must be at least 1")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")


class SdWebUIBackend(HttpBackend[SdWebUIOptions]):
    kind: ClassVar[str] = "sdwebui"
    options_class: ClassVar[type[BackendOptions]] = SdWebUIOptions

    _warned_unnamed = False  # "info names no model" is logged once per backend

    @functools.cached_property
    def _wanted(self) -> ModelId | None:
        """The configured checkpoint as ``info`` would name it; None when unpinned."""
        return model_id(self.options.checkpoint) if self.options.checkpoint else None

    @property
    def controls(self) -> Controls:
        """``denoising_strength``, ``seed`` (image i of a batch gets seed + i) and the
        hint appended to ``prompt``: img2img takes all three."""
        return Controls(strength=self.options.denoising_strength, seed=True, prompt=True)

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
            "denoising_strength": o.denoising_strength if request.strength is None
            else request.strength,
            "prompt": with_hint(o.prompt, request.prompt),
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
        self.check_model(payload.get("info"))
        # Extensions (ControlNet ...) may append extra images after the batch.
        return [decode_b64(self.name, item) for item in images[:count]]

    def check_model(self, info: object) -> None:
        """Raise ``upstream_model_mismatch`` when ``info`` names another checkpoint.

        The error counts against the breaker (the upstream is misconfigured for us), is
        not retried on this backend (the next call would draw with the same model) and
        lets the route fall back to its next backend. An ``info`` that names no model
        (an older or trimmed fork) is accepted, with one warning per backend.
        """
        if self._wanted is None:
            return
        try:
            fields = json.loads(info) if isinstance(info, str) else info
        except (ValueError, RecursionError):
            fields = None
        if not isinstance(fields, dict):
            fields = {}
        name, digest = fields.get("sd_model_name"), fields.get("sd_model_hash")
        used = model_id(name if isinstance(name, str) else None,
                        digest if isinstance(digest, str) else None)
        verdict = same_model(self._wanted, used)
        if verdict is None:
            if not self._warned_unnamed:
                self._warned_unnamed = True
                log.warning("sdwebui_model_unverified", backend=self.name,
                            reason="response info names no comparable model")
            return
        if verdict:
            return
        shown = _shown(name if isinstance(name, str) and name else str(digest))
        raise BackendError(
            502, f"Backend {self.name!r} drew with model {shown!r}, not the configured "
            f"checkpoint {self.options.checkpoint!r}; the gateway admin must install or "
            "rename it.", code="upstream_model_mismatch", kind="model_mismatch",
            transient=False, retryable=True, trips_breaker=True, should_retry=False)

    async def generate(self, request: VariationRequest) -> Generation:
        images: list[bytes] = []
        for offset, count in batches(request.n, self.options.max_batch_size):
            images += await self._img2img(request, offset, count)
        return Generation(await to_pngs(self.name, images, request.size))
