"""``kind: comfyui``: a user-supplied ComfyUI workflow, queued over ComfyUI's HTTP API.

Upload the source (``POST /upload/image``), queue the workflow template with its
placeholders filled (``POST /prompt``), poll ``GET /history/{prompt_id}`` until it is
done, fetch each output with ``GET /view``. Polling rather than the websocket keeps one
code path for every ComfyUI version and every reverse proxy; the poll interval is small
next to a diffusion run. A request that is given up on (timeout, client gone) is removed
from ComfyUI's queue so it does not burn GPU time for nobody.

Placeholders are JSON strings: ``"{{seed}}"``, ``"{{batch_size}}"``, ``"{{width}}"``,
``"{{height}}"`` become numbers, ``"{{image}}"``, ``"{{prompt}}"``,
``"{{negative_prompt}}"`` strings (also inside longer strings).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import structlog

from gateway.backends.base import BackendOptions, Generation, VariationRequest
from gateway.backends.http import (
    HttpBackend,
    UpstreamError,
    bad_response,
    check_base_url,
    gather_all,
    strip_userinfo,
    to_pngs,
)

log = structlog.get_logger("gateway.backends.comfyui")
_PLACEHOLDER = re.compile(r"\{\{(image|seed|batch_size|width|height|prompt|negative_prompt)\}\}")
_NUMERIC = frozenset({"seed", "batch_size", "width", "height"})


@dataclass(frozen=True)
class ComfyUIOptions(BackendOptions):
    """``workflow`` is an API-format workflow JSON (ComfyUI: *Export (API)*);
    ``api_key`` is sent as a bearer token, for a ComfyUI behind an authenticating proxy."""

    base_url: str
    workflow: str
    api_key: str = field(default="", repr=False)
    native_size: int = 512
    prompt: str = ""
    negative_prompt: str = ""
    poll_interval_seconds: float = 0.25

    def __post_init__(self) -> None:
        check_base_url(self.base_url)
        if self.native_size < 64 or self.native_size % 8:
            raise ValueError("native_size must be a multiple of 8, at least 64")
        if self.poll_interval_seconds <= 0:
            raise ValueError("poll_interval_seconds must be positive")


def load_workflow(path: str) -> tuple[dict[str, Any], str]:
    """The template and a digest of its text; ``ValueError`` says what is wrong."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read workflow {path}: {exc.strerror}") from None
    try:
        template = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"workflow {path} is not JSON: {exc}") from None
    if not isinstance(template, dict) or not template:
        raise ValueError(f"workflow {path} must be an API-format object of nodes")
    if "{{image}}" not in text:
        raise ValueError(f"workflow {path} has no \"{{{{image}}}}\" placeholder")
    return template, hashlib.sha256(text.encode()).hexdigest()[:16]


def fill(node: Any, values: dict[str, Any]) -> Any:
    """``node`` with every placeholder replaced from ``values``."""
    if isinstance(node, dict):
        return {k: fill(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [fill(v, values) for v in node]
    if isinstance(node, str):
        whole = _PLACEHOLDER.fullmatch(node)
        if whole and whole.group(1) in _NUMERIC:
            return values[whole.group(1)]
        return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), node)
    return node


class ComfyUIBackend(HttpBackend):
    kind: ClassVar[str] = "comfyui"
    options_class: ClassVar[type[BackendOptions]] = ComfyUIOptions

    def __init__(self, name: str, options: ComfyUIOptions) -> None:
        super().__init__(name, options.base_url)
        self.options = options
        self.template, self._digest = load_workflow(options.workflow)
        self.client_id = uuid.uuid4().hex
        self._cleanups: set[asyncio.Task[None]] = set()

    @property
    def identity(self) -> str:
        o = self.options
        return (f"comfyui:{strip_userinfo(self.base_url)}:{self._digest}:{o.native_size}:"
                f"{o.prompt}:{o.negative_prompt}")

    def headers(self) -> dict[str, str]:
        headers = super().headers()
        if self.options.api_key:
            headers["Authorization"] = f"Bearer {self.options.api_key}"
        return headers

    async def close(self) -> None:
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)
        await super().close()

    async def _upload(self, request: VariationRequest) -> str:
        digest = request.image.pixels_sha256 or request.image.upload_sha256
        form = aiohttp.FormData()
        form.add_field("image", request.image.png, filename=f"vg-{digest[:32]}.png",
                       content_type="image/png")
        form.add_field("overwrite", "true")
        answer = await self.request_json("POST", "/upload/image", data=form)
        if not isinstance(answer, dict) or not isinstance(answer.get("name"), str):
            raise bad_response(self.name, "upload answer has no name")
        subfolder = answer.get("subfolder") or ""
        return f"{subfolder}/{answer['name']}" if subfolder else answer["name"]

    async def _queue(self, request: VariationRequest, image: str) -> str:
        o = self.options
        workflow = fill(self.template, {
            "image": image, "seed": request.seed, "batch_size": request.n,
            "width": o.native_size, "height": o.native_size, "prompt": o.prompt,
            "negative_prompt": o.negative_prompt})
        answer = await self.request_json("POST", "/prompt",
                                         json={"prompt": workflow, "client_id": self.client_id})
        prompt_id = answer.get("prompt_id") if isinstance(answer, dict) else None
        if not isinstance(prompt_id, str) or not prompt_id:
            raise bad_response(self.name, "no prompt_id")
        return prompt_id

    async def _wait(self, prompt_id: str) -> dict[str, Any]:
        while True:
            history = await self.request_json("GET", f"/history/{prompt_id}")
            entry = history.get(prompt_id) if isinstance(history, dict) else None
            if isinstance(entry, dict):
                # Forks and proxies vary: a status that is not an object says nothing.
                status = entry.get("status")
                if not isinstance(status, dict):
                    status = {}
                if status.get("status_str") == "error":
                    raise UpstreamError(502, f"Backend {self.name!r}: the workflow failed.",
                                        code="upstream_error", kind="workflow_error")
                outputs = entry.get("outputs")
                if status.get("completed", True) and isinstance(outputs, dict):
                    return outputs
            await asyncio.sleep(self.options.poll_interval_seconds)

    def _pick(self, outputs: dict[str, Any], n: int) -> list[dict[str, Any]]:
        images = [img for node in sorted(outputs, key=str)
                  for img in _node_images(outputs[node])
                  if isinstance(img, dict) and isinstance(img.get("filename"), str)]
        saved = [img for img in images if img.get("type") == "output"] or images
        if len(saved) < n:
            raise bad_response(self.name, f"{len(saved)} images instead of {n}")
        return saved[:n]

    async def _fetch(self, image: dict[str, Any]) -> bytes:
        params = {"filename": image["filename"], "subfolder": _text(image.get("subfolder")),
                  "type": _text(image.get("type")) or "output"}
        body, _ = await self.request("GET", "/view", params=params)
        return body

    def _forget(self, prompt_id: str) -> None:
        """Drop an abandoned prompt from ComfyUI's queue (and stop it if it runs)."""
        async def cleanup() -> None:
            try:
                async with asyncio.timeout(5):
                    await self.request("POST", "/queue", json={"delete": [prompt_id]})
                    await self.request("POST", "/interrupt", json={"prompt_id": prompt_id})
            except (UpstreamError, TimeoutError):
                log.info("comfyui_cleanup_failed", backend=self.name)
        task = asyncio.get_running_loop().create_task(cleanup())
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def generate(self, request: VariationRequest) -> Generation:
        image = await self._upload(request)
        prompt_id = await self._queue(request, image)
        try:
            outputs = await self._wait(prompt_id)
        except BaseException:
            self._forget(prompt_id)
            raise
        images = await gather_all(*(self._fetch(i) for i in self._pick(outputs, request.n)))
        return Generation(await to_pngs(self.name, images, request.size))


def _node_images(node: Any) -> list[Any]:
    """A history output node's ``images`` list; nodes without one (text, latents) or of
    another shape contribute nothing."""
    images = node.get("images") if isinstance(node, dict) else None
    return images if isinstance(images, list) else []


def _text(value: Any) -> str:
    """A query value from history: only strings are passed on."""
    return value if isinstance(value, str) else ""
