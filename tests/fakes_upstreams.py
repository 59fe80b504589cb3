"""Fake upstream servers that follow each backend's documented HTTP API.

Built from /work/shared/reference/backends.md: an OpenAI-compatible variations server,
OpenAI's ``/v1/images/edits`` for gpt-image, Stable Diffusion WebUI's ``img2img`` and
ComfyUI's upload/prompt/history/view. Each one validates what it receives the way the
real server would (a malformed call gets a 4xx, so a wrong request shape fails a test),
records every request for assertions, and has a fault switch.

Faults (``fake.inject(fault, times=None)``; ``None`` = every call):

* on the main call: ``hang`` (accept, never answer), ``reset`` (headers and part of the
  body, then the connection drops), ``500``, ``503`` (with ``retry-after``), ``429``,
  ``bad_json``, ``deep_json`` (a 200 whose JSON nests deeper than Python's stack),
  ``deep_error`` (the same as a 400 error body), ``auth`` (401), ``content_policy``
  (400 safety rejection);
* on the returned images: ``truncated_b64`` (cut mid-image), ``not_png`` (a GIF),
  ``wrong_size`` (300x200), ``trailing_bytes`` (two stray bytes after IEND),
  ``corrupt_idat`` (well framed, every CRC right, but IDAT is not a zlib stream).

Error bodies echo the caller's credentials, like a careless upstream: if the gateway ever
passed an upstream body through, the canary test would see the key.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import io
import json
import posixpath
import random
import struct
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from PIL import Image, ImageDraw, ImageFilter

HTTP_FAULTS = frozenset({"hang", "reset", "500", "503", "429", "bad_json", "deep_json",
                         "deep_error", "auth", "content_policy"})
IMAGE_FAULTS = frozenset({"truncated_b64", "not_png", "wrong_size", "trailing_bytes",
                          "corrupt_idat"})
SIZES = ("256x256", "512x512", "1024x1024")
DEEP_JSON = b"[" * 100_000 + b"]" * 100_000


def png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(
        ">I", zlib.crc32(ctype + body))


def corrupt_idat_png(width: int, height: int) -> bytes:
    """A PNG whose container is flawless (8-bit RGB, CRCs right) but whose pixel data is
    garbage: only inflating IDAT shows it is broken."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", b"garbage, not a zlib stream" * 8) + png_chunk(b"IEND", b""))


def image_bytes(width: int, height: int, index: int, fmt: str = "PNG") -> bytes:
    """A cheap, distinct image per ``index`` (flat colour plus one marker pixel)."""
    colour = ((index * 53) % 256, (index * 101 + 40) % 256, (index * 197 + 80) % 256)
    img = Image.new("RGB", (width, height), colour)
    img.putpixel((0, 0), (index % 256, 255 - index % 256, 7))
    buf = io.BytesIO()
    img.save(buf, fmt, **({"compress_level": 1} if fmt == "PNG" else {}))
    return buf.getvalue()


@functools.lru_cache(maxsize=8)
def _photo_base(width: int, height: int) -> Image.Image:
    """Smooth shapes, gradients and film grain: compresses like a photograph (a 1024 px
    PNG of it is about 1.7 MB, as gpt-image's answers are 1.5-3 MB; backends.md)."""
    w4, h4 = max(1, width // 4), max(1, height // 4)
    noise = Image.effect_noise((w4, h4), 40).resize((width, height),
                                                    Image.Resampling.BICUBIC)
    grad = Image.linear_gradient("L").resize((width, height))
    img = Image.merge("RGB", (grad, noise, grad.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    draw = ImageDraw.Draw(img)
    for i in range(12):
        x, y = i * width // 14, i * height // 20
        draw.ellipse((x, y, x + width // 3, y + height // 5),
                     fill=((i * 40) % 256, (i * 90) % 256, (i * 20) % 256))
    img = img.filter(ImageFilter.GaussianBlur(3))
    grain = Image.effect_noise((width, height), 18)
    return Image.blend(img, Image.merge("RGB", (grain, grain, grain)), 0.25)


def photo_like(width: int, height: int, index: int, fmt: str = "PNG") -> bytes:
    """A photo-like image of real-world size, distinct per ``index`` (a coloured block)."""
    img = _photo_base(width, height).copy()
    colour = ((index * 53) % 256, (index * 101 + 40) % 256, (index * 197 + 80) % 256)
    img.paste(colour, (0, 0, width // 4, height // 4))
    buf = io.BytesIO()
    options: dict[str, Any] = {"compress_level": 1} if fmt == "PNG" else {"quality": 90}
    img.save(buf, fmt, **options)
    return buf.getvalue()


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    query: dict[str, str]
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, tuple[str, str, bytes]] = field(default_factory=dict)
    json: Any = None


REC = web.RequestKey("recorded", Recorded)


def reject(status: int, message: str, code: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error",
                                        "param": None, "code": code}}, status=status)


class FakeUpstream:
    """Common machinery: recording, the fault switch, credentials, image faults."""

    main_path = ""
    # Answer photo-like images of real-world size (see photo_like): what a real upstream
    # sends, so decoding and resizing cost what they cost in production.
    photo = False

    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.requests: list[Recorded] = []
        self.retry_after = "1"
        self.retry_after_ms: str | None = None
        self.gate = asyncio.Event()  # cleared: main calls wait here (held in flight)
        self.gate.set()
        self.arrived = 0  # main calls that reached the handler
        self._unhang = asyncio.Event()
        self._fault: str | None = None
        self._times: int | None = None
        self.app = web.Application(middlewares=[self._record], client_max_size=64 << 20)

    def error_body(self, message: str, code: str | None = None) -> dict[str, Any]:
        """An error body in this upstream's own shape (OpenAI's envelope by default)."""
        return {"error": {"message": message, "type": "server_error", "code": code}}

    # ---- switch
    def inject(self, fault: str | None, times: int | None = None) -> None:
        assert fault is None or fault in HTTP_FAULTS | IMAGE_FAULTS, fault
        self._fault, self._times = fault, times

    def release(self) -> None:
        """Let hung and gated calls end, so the server can shut down promptly."""
        self._unhang.set()
        self.gate.set()

    def _take(self, kinds: frozenset[str]) -> str | None:
        if self._fault not in kinds or self._times == 0:
            return None
        if self._times is not None:
            self._times -= 1
        return self._fault

    def calls(self, path: str | None = None) -> list[Recorded]:
        path = path or self.main_path
        return [r for r in self.requests if r.path == path]

    # ---- recording and auth
    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        rec = Recorded(request.method, request.path, dict(request.headers),
                       dict(request.query))
        if request.content_type == "multipart/form-data":
            form = await request.post()
            for key, value in form.items():
                if isinstance(value, web.FileField):
                    rec.files[key] = (value.filename, value.content_type, value.file.read())
                else:
                    rec.fields[key] = str(value)
        elif request.content_type == "application/json" and request.can_read_body:
            try:
                rec.json = json.loads(await request.read())
            except ValueError:
                return reject(400, "body is not JSON")
        self.requests.append(rec)
        request[REC] = rec
        denied = self.check_auth(request)
        if denied is not None:
            return denied
        if request.path == self.main_path:
            self.arrived += 1
            await self.gate.wait()
            fault = self._take(HTTP_FAULTS)
            if fault is not None:
                return await self.http_fault(request, fault)
        return await handler(request)

    def check_auth(self, request: web.Request) -> web.Response | None:
        if self.api_key is None:
            return None
        given = request.headers.get("Authorization", "")
        if given != f"Bearer {self.api_key}":
            return reject(401, f"Incorrect API key provided: {given}.", "invalid_api_key")
        return None

    async def http_fault(self, request: web.Request, fault: str) -> web.StreamResponse:
        echo = request.headers.get("Authorization", "")
        if fault == "hang":  # until the test ends (see release)
            await self._unhang.wait()
            return web.Response(status=500)
        if fault == "reset":
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.content_length = 100_000
            await resp.prepare(request)
            await resp.write(b'{"created": 1, "data": [{"b64_json": "iVBORw0KGgo')
            assert request.transport is not None
            request.transport.abort()
            return resp
        if fault == "500":
            return web.json_response(self.error_body(f"boom (auth was {echo})"), status=500)
        if fault == "503":
            headers = {"retry-after": self.retry_after}
            if self.retry_after_ms is not None:
                headers["retry-after-ms"] = self.retry_after_ms
            return web.json_response(self.error_body(f"overloaded {echo}"),
                                     status=503, headers=headers)
        if fault == "429":
            return web.json_response(
                {"error": {"message": f"Rate limit reached for {echo}",
                           "code": "rate_limit_exceeded", "type": "requests"}},
                status=429, headers={"x-ratelimit-limit-requests": "5",
                                     "x-ratelimit-remaining-requests": "0",
                                     "x-ratelimit-reset-requests": "12ms"})
        if fault == "bad_json":
            return web.Response(body=b'{"created": 1, "data": [{"b64_json": ' +
                                echo.encode(), content_type="application/json")
        if fault in ("deep_json", "deep_error"):
            return web.Response(body=DEEP_JSON, content_type="application/json",
                                status=200 if fault == "deep_json" else 400)
        if fault == "auth":
            return reject(401, f"Incorrect API key provided: {echo}.", "invalid_api_key")
        assert fault == "content_policy"
        return reject(400, "Your request was rejected as a result of our safety system. "
                      f"({echo})", "content_policy_violation")

    # ---- images
    def make_image(self, width: int, height: int, index: int, fmt: str = "PNG",
                   photo: bool = False) -> bytes:
        """An output image, with an image fault applied if one is switched on;
        ``photo``: a photo-like picture of real-world size (see :func:`photo_like`)."""
        fault = self._take(IMAGE_FAULTS)
        if fault == "wrong_size":
            return image_bytes(300, 200, index)
        if fault == "not_png":
            return image_bytes(width, height, index, "GIF")
        if fault == "corrupt_idat":
            return corrupt_idat_png(width, height)
        data = photo_like(width, height, index, fmt) if photo or self.photo else image_bytes(
            width, height, index, fmt)
        if fault == "truncated_b64":
            return data[: len(data) // 2]
        if fault == "trailing_bytes":
            return data + b"\x00\x00"
        return data

    def b64_image(self, width: int, height: int, index: int, fmt: str = "PNG") -> str:
        return base64.b64encode(self.make_image(width, height, index, fmt)).decode()


def _is_png(data: bytes) -> bool:
    return data.startswith(b"\x89PNG\r\n\x1a\n")


class OpenAIModelsFake(FakeUpstream):
    """OpenAI's ``GET /v1/models`` and ``GET /v1/models/{id}`` (API reference "Models:
    list / retrieve"; ``shutdown_date`` per developers.openai.com/api/docs/deprecations).

    Any model is known, with ``shutdown_dates[id]`` (``YYYY-MM-DD``) or null, except the
    ``retired_models``: 404 ``model_not_found``, as OpenAI answers for a removed model.
    """

    def __init__(self, api_key: str | None = None) -> None:
        super().__init__(api_key)
        self.shutdown_dates: dict[str, str] = {}
        self.retired_models: set[str] = set()
        self.app.router.add_get("/v1/models", self.list_models)
        self.app.router.add_get("/v1/models/{model}", self.retrieve_model)

    def model_json(self, model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": 1_700_000_000,
                "owned_by": "system", "shutdown_date": self.shutdown_dates.get(model)}

    async def list_models(self, request: web.Request) -> web.Response:
        known = sorted(set(self.shutdown_dates) - self.retired_models)
        return web.json_response({"object": "list", "data": [self.model_json(m) for m in known]})

    async def retrieve_model(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        if model in self.retired_models:
            return reject(404, f"The model `{model}` does not exist or you do not have "
                          "access to it.", "model_not_found")
        return web.json_response(self.model_json(model))


class OpenAIVariationsFake(OpenAIModelsFake):
    """``POST /v1/images/variations`` exactly as OpenAI documented it (the contract this
    gateway itself serves: another instance of it as an upstream); URLs at /files/.
    ``extra_fields``: fields taken beyond the contract (this gateway's own variation
    controls, when it is not in ``api.strict_contract``)."""

    main_path = "/v1/images/variations"
    FIELDS = frozenset({"model", "n", "size", "response_format", "user"})

    def __init__(self, api_key: str | None = None, extra_fields: tuple[str, ...] = ()
                 ) -> None:
        super().__init__(api_key)
        self.fields = self.FIELDS | set(extra_fields)
        self.files: dict[str, bytes] = {}
        self.app.router.add_post(self.main_path, self.variations)
        self.app.router.add_get("/files/{name}", self.file)

    def check_auth(self, request: web.Request) -> web.Response | None:
        if request.path.startswith("/files/"):  # signed URLs need no key
            return None
        return super().check_auth(request)

    async def variations(self, request: web.Request) -> web.Response:
        rec: Recorded = request[REC]
        image = rec.files.get("image")
        if image is None:
            return reject(400, "'image' is a required property")
        if not _is_png(image[2]):
            return reject(400, "Uploaded image must be a PNG and less than 4 MB.")
        unknown = set(rec.fields) - self.fields
        if unknown:
            return reject(400, f"Unknown parameter: '{sorted(unknown)[0]}'.",
                          "unknown_parameter")
        n = int(rec.fields.get("n", "1"))
        size = rec.fields.get("size", "1024x1024")
        fmt = rec.fields.get("response_format", "url")
        if not 1 <= n <= 10 or size not in SIZES or fmt not in ("url", "b64_json"):
            return reject(400, "Invalid value.", "invalid_value")
        edge = int(size.split("x")[0])
        data = []
        for i in range(n):
            if fmt == "b64_json":
                data.append({"b64_json": self.b64_image(edge, edge, i)})
            else:
                name = uuid.uuid4().hex + ".png"
                self.files[name] = self.make_image(edge, edge, i)
                data.append({"url": f"http://{request.host}/files/{name}?sig=x"})
        return web.json_response({"created": int(time.time()), "data": data})

    async def file(self, request: web.Request) -> web.Response:
        body = self.files.get(request.match_info["name"])
        if body is None:
            raise web.HTTPNotFound()
        return web.Response(body=body, content_type="image/png")


def _wxh(size: str) -> tuple[int, int] | None:
    w, sep, h = size.partition("x")
    return (int(w), int(h)) if sep and w.isdigit() and h.isdigit() else None


class XinferenceFake(FakeUpstream):
    """Xinference's ``create_variations`` (xorbitsai/inference
    ``xinference/api/restful_api.py``, 2026-08, as summarised in backends.md).

    ``model`` must be the UID of a launched model (else 404 FastAPI ``{"detail"}``, the
    supervisor's "Model not found in the model list, uid: ..."); the img2img pipeline
    refuses a missing ``prompt`` (a diffusers ValueError, answered 500); ``size`` is any
    ``WxH``; ``response_format=url`` answers a path on the server's own disk; ``kwargs``
    is a JSON string of pipeline arguments; ``user`` is ignored; errors are
    ``{"detail"}``; 503 with ``Retry-After`` while a model loads (the ``503`` fault).
    """

    photo = True

    main_path = "/v1/images/variations"

    def __init__(self, api_key: str | None = None, models: tuple[str, ...] = ("sd-img2img",),
                 image_format: str = "PNG") -> None:
        super().__init__(api_key)
        self.models = set(models)
        self.image_format = image_format  # the pipeline's base64 may be PNG or JPEG
        # A proxy or fork that answers paths whatever response_format says.
        self.always_paths = False
        self.app.router.add_post(self.main_path, self.variations)

    def error_body(self, message: str, code: str | None = None) -> dict[str, Any]:
        return {"detail": message}  # FastAPI's HTTPException body

    async def variations(self, request: web.Request) -> web.Response:
        rec: Recorded = request[REC]
        model = rec.fields.get("model")
        if model is None:
            return web.json_response({"detail": [{"type": "missing", "loc": ["body", "model"],
                                                  "msg": "Field required"}]}, status=422)
        if model not in self.models:
            return web.json_response(
                {"detail": f"Model not found in the model list, uid: {model}"}, status=404)
        image = rec.files.get("image")
        if image is None:
            return web.json_response({"detail": [{"type": "missing", "loc": ["body", "image"],
                                                  "msg": "Field required"}]}, status=422)
        if not rec.fields.get("prompt"):
            return web.json_response({"detail": "`prompt` has to be of type `str` or `list` "
                                                "but is <class 'NoneType'>"}, status=500)
        try:
            kwargs = json.loads(rec.fields.get("kwargs") or "{}")
        except ValueError:
            return web.json_response({"detail": "kwargs is not valid JSON"}, status=400)
        strength = kwargs.get("strength", 0.8) if isinstance(kwargs, dict) else 0.8
        if not isinstance(strength, int | float) or not 0 <= strength <= 1:
            # diffusers pipeline_stable_diffusion_img2img.py check_inputs raises this
            # ValueError (its message verbatim); create_variations answers any pipeline
            # exception 500 {"detail"} (backends.md). kwargs "seed" is taken as is.
            return web.json_response({"detail": "The value of strength should in [0.0, "
                                                f"1.0] but is {strength}"}, status=500)
        n = int(rec.fields.get("n", "1"))
        wh = _wxh(rec.fields.get("size", "1024x1024"))
        if wh is None:
            return web.json_response({"detail": "invalid size"}, status=500)
        if self.always_paths or rec.fields.get("response_format", "url") == "url":
            data = [{"url": f"/home/xinference/.xinference/image/{uuid.uuid4().hex}.jpg"}
                    for _ in range(n)]
        else:
            data = [{"b64_json": base64.b64encode(self.make_image(
                wh[0], wh[1], i, self.image_format)).decode()} for i in range(n)]
        return web.json_response({"created": int(time.time()), "data": data})


class LemonadeFake(FakeUpstream):
    """AMD Lemonade's image variations handler (lemonade-sdk/lemonade
    ``src/cpp/server/server.cpp``, 2026-08, as summarised in backends.md): the same
    handler under ``/v1/``, ``/api/v1/``, ``/v0/`` and ``/api/v0/``; multipart only (else
    400 with an ``error`` object); ``model`` required and known (else 404); ``n`` 1..10;
    ``size`` passed through; ``response_format`` not honoured (always base64); ``user``
    accepted; generation errors are 500 with an ``error`` object."""

    photo = True

    main_path = "/v1/images/variations"

    def __init__(self, api_key: str | None = None,
                 models: tuple[str, ...] = ("SD-Turbo",)) -> None:
        super().__init__(api_key)
        self.models = set(models)
        for prefix in ("/v1", "/api/v1", "/v0", "/api/v0"):
            self.app.router.add_post(prefix + "/images/variations", self.variations)

    def calls(self, path: str | None = None) -> list[Recorded]:
        if path is not None:
            return super().calls(path)
        return [r for r in self.requests if r.path.endswith("/images/variations")]

    async def variations(self, request: web.Request) -> web.Response:
        rec: Recorded = request[REC]
        if request.content_type != "multipart/form-data":
            return web.json_response({"error": {"message": "Expected multipart/form-data",
                                                "type": "invalid_request_error"}}, status=400)
        model = rec.fields.get("model")
        if not model:
            return web.json_response({"error": {"message": "model is required",
                                                "type": "invalid_request_error"}}, status=400)
        if model not in self.models:
            return web.json_response({"error": {"message": f"Model {model} not found",
                                                "type": "not_found"}}, status=404)
        if "image" not in rec.files:
            return web.json_response({"error": {"message": "image is required",
                                                "type": "invalid_request_error"}}, status=400)
        n = int(rec.fields.get("n", "1"))
        if not 1 <= n <= 10:
            return web.json_response({"error": {"message": "n must be between 1 and 10",
                                                "type": "invalid_request_error"}}, status=400)
        wh = _wxh(rec.fields.get("size", "512x512")) or (512, 512)
        data = [{"b64_json": self.b64_image(wh[0], wh[1], i)} for i in range(n)]
        return web.json_response({"created": int(time.time()), "data": data})


# OpenAI's image models on 2026-12-03 (developers.openai.com/api/docs/deprecations):
ALIVE_IMAGE_MODELS = frozenset({"gpt-image-2", "gpt-image-2-2026-04-21",
                                "gpt-image-2.5-flare", "gpt-image-2.5-sunburst",
                                "gpt-image-2.6-flare", "gpt-image-2.6-sunburst"})
RETIRED_IMAGE_MODELS = frozenset({"dall-e-2", "gpt-image-1", "gpt-image-1-mini",
                                  "gpt-image-1.5", "chatgpt-image-latest"})


class OpenAIEditsFake(OpenAIModelsFake):
    """``POST /v1/images/edits`` for gpt-image, as strict as the real one.

    Sources: openai/openai-openapi ``CreateImageEditRequest`` (2026-08) and
    openai-python ``resources/images.py``, as summarised in backends.md. Unknown fields
    are a 400 ``unknown_parameter``; retired or unknown models ``model_not_found``;
    ``quality`` ``xhigh``/``max`` only on 2.5/2.6, ``complexity`` only on 2.6,
    ``input_fidelity`` refused by gpt-image-2; sizes 1024x1024/1536x1024/1024x1536/auto,
    and from gpt-image-2 on any WxH in multiples of 16 up to 3840 px at most 3:1. Answers
    are base64 only, photo-like (a 1024 px PNG is 1.5-2 MB) in the ``output_format``
    asked for, with ``usage``; the safety refusal is ``moderation_blocked``.
    """

    main_path = "/v1/images/edits"
    FIELDS = frozenset({"image", "image[]", "mask", "prompt", "model", "n", "size",
                        "quality", "output_format", "output_compression", "background",
                        "moderation", "input_fidelity", "complexity", "safety_identifier",
                        "user", "partial_images", "stream", "response_format"})
    FIXED_SIZES = {"1024x1024": (1024, 1024), "1536x1024": (1536, 1024),
                   "1024x1536": (1024, 1536), "auto": (1024, 1024)}

    def __init__(self, api_key: str | None = None) -> None:
        super().__init__(api_key)
        self.retired_models = set(RETIRED_IMAGE_MODELS)
        self.app.router.add_post(self.main_path, self.edits)

    async def http_fault(self, request: web.Request, fault: str) -> web.StreamResponse:
        if fault == "content_policy":  # gpt-image's safety refusal
            return web.json_response({"error": {
                "message": "Your request was rejected by the safety system. "
                           f"({request.headers.get('Authorization', '')})",
                "type": "image_generation_user_error", "param": None,
                "code": "moderation_blocked"}}, status=400)
        return await super().http_fault(request, fault)

    def _size(self, model: str, size: str) -> tuple[int, int] | None:
        if size in self.FIXED_SIZES:
            return self.FIXED_SIZES[size]
        wh = _wxh(size)
        if wh is None or model.startswith("gpt-image-1"):
            return None
        w, h = wh
        ok = w % 16 == 0 and h % 16 == 0 and max(w, h) <= 3840 and max(w, h) <= 3 * min(w, h)
        return wh if ok else None

    def _refusal(self, rec: Recorded) -> web.Response | None:
        f = rec.fields
        unknown = set(f) - self.FIELDS
        if unknown:
            return reject(400, f"Unknown parameter: '{sorted(unknown)[0]}'.",
                          "unknown_parameter")
        model = f.get("model", "")
        if model not in ALIVE_IMAGE_MODELS:
            return reject(404, f"The model `{model}` does not exist or you do not have "
                          "access to it.", "model_not_found")
        if not f.get("prompt"):
            return reject(400, "'prompt' is a required property")
        quality = f.get("quality", "auto")
        late = model.startswith(("gpt-image-2.5", "gpt-image-2.6"))
        if quality not in ("low", "medium", "high", "auto") and not (
                late and quality in ("xhigh", "max")):
            return reject(400, f"Invalid value: '{quality}'.", "invalid_value")
        if "complexity" in f and not model.startswith("gpt-image-2.6"):
            return reject(400, "complexity is not supported for this model.",
                          "invalid_value")
        if "input_fidelity" in f and model.startswith("gpt-image-2"):
            return reject(400, "input_fidelity is not supported for this model.",
                          "invalid_value")
        fmt = f.get("output_format", "png")
        if fmt not in ("png", "jpeg", "webp") or (
                "output_compression" in f and fmt == "png"):
            return reject(400, "Invalid output_format or output_compression.",
                          "invalid_value")
        if f.get("background", "auto") not in ("auto", "opaque", "transparent") or \
                f.get("moderation", "auto") not in ("auto", "low"):
            return reject(400, "Invalid value.", "invalid_value")
        if not 1 <= int(f.get("n", "1")) <= 10 or self._size(
                model, f.get("size", "auto")) is None:
            return reject(400, "Invalid value.", "invalid_value")
        return None

    async def edits(self, request: web.Request) -> web.Response:
        rec: Recorded = request[REC]
        image = rec.files.get("image") or rec.files.get("image[]")
        if image is None:
            return reject(400, "'image' is a required property")
        if not (_is_png(image[2]) or image[2][:3] == b"\xff\xd8\xff"):
            return reject(400, "Invalid image file or mode.")
        refusal = self._refusal(rec)
        if refusal is not None:
            return refusal
        f = rec.fields
        n = int(f.get("n", "1"))
        size = self._size(f["model"], f.get("size", "auto"))
        assert size is not None
        fmt = f.get("output_format", "png")
        offset = len(self.calls()) * 100
        data = [{"b64_json": base64.b64encode(self.make_image(
            size[0], size[1], offset + i, {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt],
            photo=True)).decode()} for i in range(n)]
        return web.json_response({
            "created": int(time.time()), "data": data,
            "usage": {"input_tokens": 50 + 323, "output_tokens": 272 * n,
                      "total_tokens": 373 + 272 * n,
                      "input_tokens_details": {"text_tokens": 50, "image_tokens": 323}},
            "size": f"{size[0]}x{size[1]}", "quality": f.get("quality", "auto"),
            "output_format": fmt, "background": f.get("background", "opaque"),
        })


@dataclass(frozen=True)
class Checkpoint:
    """One entry of WebUI's checkpoint list, as ``GET /sdapi/v1/sd-models`` shows it.

    ``aliases`` are what ``override_settings.sd_model_checkpoint`` may name: A1111
    ``modules/sd_models.py`` ``CheckpointInfo.ids`` (title, file name, name without
    extension, old hash, shorthash, sha256, "name [hash]" forms).
    """

    filename: str  # relative to models/Stable-diffusion, e.g. "sd_xl_base_1.0.safetensors"
    sha256: str
    old_hash: str = "0badf00d"  # the pre-sha256 8-digit "model hash"

    @property
    def name_for_extra(self) -> str:
        """What ``info.sd_model_name`` says: the basename without extension."""
        return self.filename.rsplit("/", 1)[-1].rsplit(".", 1)[0]

    @property
    def shorthash(self) -> str:
        return self.sha256[:10]

    @property
    def title(self) -> str:
        return f"{self.filename} [{self.shorthash}]"

    @property
    def aliases(self) -> frozenset[str]:
        model_name = self.filename.replace("/", "_").rsplit(".", 1)[0]
        return frozenset({self.old_hash, model_name, self.title, self.filename,
                          self.name_for_extra, f"{self.filename} [{self.old_hash}]",
                          self.shorthash, self.sha256,
                          f"{self.name_for_extra} [{self.shorthash}]"})


SD15 = Checkpoint("v1-5-pruned-emaonly.safetensors",
                  "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa")
SDXL = Checkpoint("sd_xl_base_1.0.safetensors",
                  "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b")
# Fields of A1111's StableDiffusionImg2ImgProcessingAPI (modules/api/models.py, built
# from StableDiffusionProcessingImg2Img in modules/processing.py) the fake uses: every
# one has a default, and pydantic checks only their types.
IMG2IMG_DEFAULTS: dict[str, Any] = {
    "init_images": None, "prompt": "", "negative_prompt": "", "seed": -1, "width": 512,
    "height": 512, "batch_size": 1, "n_iter": 1, "steps": 50, "cfg_scale": 7.0,
    "denoising_strength": 0.75, "sampler_name": None, "sampler_index": "Euler",
    "send_images": True, "save_images": False, "override_settings": None,
}
_INT_FIELDS = ("seed", "width", "height", "batch_size", "n_iter", "steps")
SAMPLES_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}


class SdWebUIFake(FakeUpstream):
    """AUTOMATIC1111/Forge ``--api`` with optional ``--api-auth user:pass``.

    Sources: AUTOMATIC1111/stable-diffusion-webui ``modules/api/api.py`` (commit
    2fec947: ``img2imgapi``, ``decode_base64_to_image``, ``encode_pil_to_base64``,
    ``api_middleware``, ``auth``), ``modules/api/models.py``, ``modules/processing.py``
    (``process_images``, ``Processed.js``), ``modules/sd_models.py``; Forge
    (lllyasviel/stable-diffusion-webui-forge) for the ``{"detail"}`` error bodies.

    ``flavour``: ``"a1111"`` (also Forge Classic/Neo) answers errors as
    ``{"error", "detail", "body", "errors"}``; ``"forge"`` as FastAPI's ``{"detail"}``.
    ``checkpoints``/``loaded``: the installed models and the one in memory.
    ``samples_format``: the server's output format option. ``name_model_in_info``:
    ``False`` drops ``sd_model_name``/``sd_model_hash`` from ``info`` (a trimmed fork).
    """

    photo = True

    main_path = "/sdapi/v1/img2img"

    def __init__(self, basic: tuple[str, str] | None = None, flavour: str = "a1111",
                 checkpoints: tuple[Checkpoint, ...] = (SD15, SDXL),
                 loaded: Checkpoint = SD15, samples_format: str = "png") -> None:
        super().__init__(None)
        assert flavour in ("a1111", "forge"), flavour
        assert samples_format in SAMPLES_FORMATS, samples_format
        self.basic = basic
        self.flavour = flavour
        self.checkpoints = list(checkpoints)
        self.loaded = loaded
        self.samples_format = samples_format
        self.name_model_in_info = True
        self.interrupts = 0
        self.app.router.add_post(self.main_path, self.img2img)
        self.app.router.add_get("/sdapi/v1/progress", self.progress)
        self.app.router.add_post("/sdapi/v1/interrupt", self.interrupt)
        self.app.router.add_get("/sdapi/v1/sd-models", self.sd_models)

    def error(self, status: int, detail: Any, headers: dict[str, str] | None = None
              ) -> web.Response:
        """An ``HTTPException`` as each flavour answers it. A1111's ``api_middleware``
        ``handle_exception`` wraps every exception; Forge leaves FastAPI's own body."""
        if self.flavour == "forge":
            body: dict[str, Any] = {"detail": detail}
        else:
            body = {"error": "HTTPException", "detail": detail, "body": "",
                    "errors": f"{status}: {detail}"}
        return web.json_response(body, status=status, headers=headers)

    def check_auth(self, request: web.Request) -> web.Response | None:
        """``Api.auth`` behind FastAPI's ``HTTPBasic`` (fastapi/security/http.py): no
        basic credentials are "Not authenticated", undecodable ones "Invalid
        authentication credentials", wrong ones "Incorrect username or password"; all
        401 with ``WWW-Authenticate: Basic``. Every ``/sdapi`` route is guarded. Unlike
        the fault bodies, these do not echo what was sent (the real ones do not)."""
        if self.basic is None:
            return None
        challenge = {"WWW-Authenticate": "Basic"}
        scheme, _, param = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return self.error(401, "Not authenticated", challenge)
        try:
            user, sep, password = base64.b64decode(param, validate=True).decode().partition(":")
        except (binascii.Error, ValueError):
            user, sep, password = "", "", ""
        if not sep:
            return self.error(401, "Invalid authentication credentials", challenge)
        if (user, password) != self.basic:
            return self.error(401, "Incorrect username or password", challenge)
        return None

    def checkpoint(self, alias: object) -> Checkpoint | None:
        return next((c for c in self.checkpoints if alias in c.aliases), None)

    def decode_init(self, encoding: str) -> bool:
        """``decode_base64_to_image``: a ``data:image/...;base64,`` prefix is stripped;
        anything PIL cannot open is a 500 "Invalid encoded image". (A malformed prefix
        is an IndexError there, also a 500, reported under another ``error`` name.)"""
        try:
            if encoding.startswith("data:image/"):
                encoding = encoding.split(";")[1].split(",")[1]
            with Image.open(io.BytesIO(base64.b64decode(encoding))) as img:
                img.load()
        except Exception:  # A1111 catches everything here too
            return False
        return True

    async def img2img(self, request: web.Request) -> web.Response:
        body = request[REC].json
        if not isinstance(body, dict):
            return web.json_response({"detail": [{"loc": ["body"], "msg": "not a dict",
                                                  "type": "type_error.dict"}]}, status=422)
        # Unknown keys are ignored; missing ones take the model's defaults.
        req = {**IMG2IMG_DEFAULTS, **{k: v for k, v in body.items() if k in IMG2IMG_DEFAULTS}}
        bad = [k for k in _INT_FIELDS if not isinstance(req[k], int) or isinstance(req[k], bool)]
        if not isinstance(req["denoising_strength"], (int, float)):
            bad.append("denoising_strength")
        if bad:  # pydantic's RequestValidationError keeps FastAPI's own 422 body
            return web.json_response({"detail": [{"loc": ["body", k], "msg": "wrong type",
                                                  "type": "type_error"} for k in bad]},
                                     status=422)
        init_images = req["init_images"]
        if init_images is None:
            return self.error(404, "Init image not found")
        if not isinstance(init_images, list) or not all(isinstance(i, str)
                                                          for i in init_images):
            return web.json_response({"detail": [{"loc": ["body", "init_images"],
                                                  "msg": "not a list of str",
                                                  "type": "type_error.list"}]}, status=422)
        if not all(self.decode_init(i) for i in init_images):
            return self.error(500, "Invalid encoded image")
        # process_images: an override naming no known checkpoint alias is dropped and
        # the loaded model draws; a known one is loaded (and, with
        # override_settings_restore_afterwards, the old one comes back after).
        overrides = req["override_settings"] or {}
        used = self.checkpoint(overrides.get("sd_model_checkpoint")) or self.loaded
        fmt = SAMPLES_FORMATS[str(overrides.get("samples_format", self.samples_format))]
        w, h = req["width"], req["height"]
        seed = req["seed"] if req["seed"] != -1 else random.randrange(2**32)
        count = req["batch_size"] * req["n_iter"]
        seeds = [seed + i for i in range(count)]  # image i of the job gets seed + i
        images = [self.b64_image(w, h, s, fmt) for s in seeds]
        if req["save_images"] and count > 1:
            # A grid (opts.return_grid) comes first unless saving is off.
            images.insert(0, base64.b64encode(image_bytes(w * count, h, 0, fmt)).decode())
        if not req["send_images"]:
            images = []
        params = {k: v for k, v in req.items() if k != "init_images"}
        info: dict[str, Any] = {"prompt": req["prompt"], "seed": seed, "all_seeds": seeds,
                                "subseed": -1, "width": w, "height": h,
                                "steps": req["steps"], "cfg_scale": req["cfg_scale"],
                                "denoising_strength": req["denoising_strength"],
                                "batch_size": req["batch_size"]}
        if self.name_model_in_info:
            info.update(sd_model_name=used.name_for_extra, sd_model_hash=used.shorthash)
        return web.json_response({"images": images, "parameters": params,
                                  "info": json.dumps(info)})

    async def progress(self, request: web.Request) -> web.Response:
        return web.json_response({"progress": 0.0, "eta_relative": 0.0, "state": {}})

    async def interrupt(self, request: web.Request) -> web.Response:
        """``interruptapi``: stops whatever runs, for every client; answers ``{}``."""
        self.interrupts += 1
        return web.json_response({})

    async def sd_models(self, request: web.Request) -> web.Response:
        return web.json_response([{"title": c.title, "model_name": c.name_for_extra,
                                   "hash": c.shorthash, "sha256": c.sha256,
                                   "filename": c.filename, "config": None}
                                  for c in self.checkpoints])


# ComfyUI's behaviour below follows Comfy-Org/ComfyUI server.py and execution.py at
# a125cd84 (2025-10-12) unless a comment names another source; backends.md lists them.
COMFY_SRC = "Comfy-Org/ComfyUI@a125cd84"
OOM_MESSAGE = (
    "Allocation on device 0 would exceed allowed memory. (out of memory)\n"
    "Currently allocated     : 3.20 GiB\x1b[0m\nRequested               : 1.50 GiB\n"
    "See https://pytorch.org/docs/stable/notes/cuda.html#environment-variables\n"
    "This error means you ran out of memory on your GPU.\n\nTIPS: If the workflow worked "
    "before you might have accidentally set the batch_size to a large number.")
TRACEBACK_LINE = '  File "/srv/ComfyUI/execution.py", line 496, in execute\n'


def _is_canonical_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def _escapes(base: str, sub: str) -> bool:
    """``os.path.commonpath((base, join(base, sub))) != base`` on a POSIX server."""
    full = posixpath.normpath(posixpath.join(base, sub))
    return full != base and not full.startswith(base + "/")


class ComfyUIFake(FakeUpstream):
    """ComfyUI's HTTP API: upload, prompt (validated), a one-at-a-time queue, history,
    view, queue/history deletion, interrupt and (newer servers) the jobs cancel call.

    A prompt waits in ``queue_pending`` until nothing runs, then runs; it finishes on
    the history poll after ``pending_polls`` polls. Switches: ``old_server`` (before
    2025-09: ``/interrupt`` stops whatever runs, no ``/api/jobs``, any ``prompt_id``),
    ``busy`` (another client's prompt runs, so ours stay pending), ``partial_node_errors``,
    ``execution_error``, ``interrupted`` (someone else interrupts our run), ``vanish``
    (deleted by someone else at once), ``status_as_string`` (a fork's history).
    """

    photo = True

    main_path = "/prompt"
    FOREIGN = "f0000000-0000-4000-8000-000000000000"  # another client's prompt

    def __init__(self, api_key: str | None = None, pending_polls: int = 2) -> None:
        super().__init__(api_key)
        self.pending_polls = pending_polls
        self.old_server = False
        self.busy = False
        self.partial_node_errors = False
        self.execution_error = False
        self.interrupted = False
        self.vanish = False
        self.status_as_string = False  # a fork or proxy answering "status": "success"
        self.stall_cleanup = False  # cancel, queue and interrupt calls never answer
        # (type, subfolder, filename) -> bytes; type is input, temp or output.
        self.files: dict[tuple[str, str, str], bytes] = {}
        self.prompts: dict[str, dict[str, Any]] = {}  # every accepted prompt, by id
        self.items: dict[str, list[Any]] = {}  # queue items [number, id, prompt, extra, outs]
        self.pending: list[str] = []
        self.running: str | None = None
        self.history_entries: dict[str, dict[str, Any]] = {}
        self.polls: dict[str, int] = {}
        self.deleted: list[str] = []  # ids named by POST /queue {"delete"}
        self.history_deleted: list[str] = []  # ids named by POST /history {"delete"}
        self.interrupts: list[Any] = []  # bodies of POST /interrupt
        self.job_cancels: list[str] = []  # ids of POST /api/jobs/{id}/cancel
        self.foreign_interrupted = 0  # another client's run stopped by us
        self.number = 0
        self.counter = 0
        r = self.app.router
        # server.py add_routes: every route also under /api (the jobs route is only
        # declared there, so it is the one without a plain twin).
        for prefix in ("", "/api"):
            r.add_post(prefix + "/upload/image", self.upload)
            r.add_post(prefix + "/prompt", self.prompt)
            r.add_get(prefix + "/history/{prompt_id}", self.history)
            r.add_post(prefix + "/history", self.post_history)
            r.add_get(prefix + "/view", self.view)
            r.add_get(prefix + "/queue", self.get_queue)
            r.add_post(prefix + "/queue", self.post_queue)
            r.add_post(prefix + "/interrupt", self.interrupt)
        r.add_post("/api/jobs/{job_id}/cancel", self.cancel_job)

    async def _stall(self) -> None:
        if self.stall_cleanup:  # until the test ends (see release)
            await self._unhang.wait()

    @property
    def uploads(self) -> dict[str, bytes]:
        """Input images by the name LoadImage takes (``subfolder/name``)."""
        return {(f"{sub}/{name}" if sub else name): body
                for (kind, sub, name), body in self.files.items() if kind == "input"}

    # ---- upload
    async def upload(self, request: web.Request) -> web.Response:
        """server.py image_upload: ``image`` needs a filename; ``overwrite`` "true"/"1"
        replaces, else a same-content file is reused and another gets " (1)"; errors
        are a bare 400."""
        rec: Recorded = request[REC]
        image = rec.files.get("image")
        if image is None or not image[0]:
            return web.Response(status=400)
        kind = rec.fields.get("type") or "input"
        if kind not in ("input", "temp", "output"):  # get_dir_by_type: unbound -> 500
            return web.Response(status=500)
        sub = rec.fields.get("subfolder", "")
        filename = image[0]
        if _escapes("/" + kind, posixpath.join(sub, filename)):
            return web.Response(status=400)
        if rec.fields.get("overwrite") not in ("true", "1"):
            stem, dot, ext = filename.rpartition(".")
            i = 1
            while (kind, sub, filename) in self.files:
                if self.files[(kind, sub, filename)] == image[2]:
                    break  # duplicate: same name back, nothing written
                filename = f"{stem} ({i}){dot}{ext}" if dot else f"{image[0]} ({i})"
                i += 1
        self.files[(kind, sub, filename)] = image[2]
        return web.json_response({"name": filename, "subfolder": sub, "type": kind})

    # ---- prompt
    @staticmethod
    def _error(kind: str, message: str, details: str = "",
               node_errors: dict[str, Any] | None = None) -> web.Response:
        """server.py post_prompt's 400: ``{error: {type, message, details, extra_info},
        node_errors}``."""
        return web.json_response({"error": {"type": kind, "message": message,
                                             "details": details, "extra_info": {}},
                                  "node_errors": node_errors or {}}, status=400)

    @staticmethod
    def _node_error(node_id: str, class_type: str, kind: str, message: str, details: str,
                    outputs: list[str]) -> dict[str, Any]:
        """execution.py validate_prompt's ``node_errors[node_id]``."""
        return {node_id: {"errors": [{"type": kind, "message": message, "details": details,
                                      "extra_info": {}}],
                          "dependent_outputs": outputs, "class_type": class_type}}

    async def prompt(self, request: web.Request) -> web.Response:
        body = request[REC].json
        if not isinstance(body, dict) or "prompt" not in body:
            return self._error("no_prompt", "No prompt provided", "No prompt provided")
        workflow = body["prompt"]
        prompt_id = body.get("prompt_id")
        if prompt_id is None:
            prompt_id = str(uuid.uuid4())
        elif not self.old_server and not (isinstance(prompt_id, str)
                                          and _is_canonical_uuid(prompt_id)):
            # Newer servers (backends.md, 2026 copy): a chosen id must be a canonical UUID.
            return self._error("invalid_prompt_id", "Invalid prompt_id",
                               "prompt_id must be a canonical UUID")
        prompt_id = str(prompt_id)
        if not isinstance(workflow, dict) or not workflow:
            return self._error("prompt_no_outputs", "Prompt has no outputs")
        for node_id, node in workflow.items():
            if not isinstance(node, dict) or "class_type" not in node:
                return self._error("invalid_prompt", "Cannot execute because a node is "
                                   "missing the class_type property.", f"Node ID '#{node_id}'")
        outputs = [k for k, n in workflow.items()
                   if n["class_type"] in ("SaveImage", "PreviewImage")]
        if not outputs:
            return self._error("prompt_no_outputs", "Prompt has no outputs")
        node_errors: dict[str, Any] = {}
        for node_id, node in workflow.items():
            for key, value in node.get("inputs", {}).items():
                if isinstance(value, str) and "{{" in value and key != "text":
                    node_errors.update(self._node_error(
                        node_id, node["class_type"], "invalid_input_type",
                        "Failed to convert an input value to a INT value",
                        f"{key}, {value}, invalid literal for int()", outputs))
            denoise = node.get("inputs", {}).get("denoise")
            if node["class_type"] == "KSampler" and isinstance(denoise, int | float) \
                    and not 0.0 <= denoise <= 1.0:
                # nodes.py KSampler: denoise is a FLOAT, min 0.0, max 1.0 (execution.py
                # validate_inputs: value_bigger_than_max / value_smaller_than_min)
                node_errors.update(self._node_error(
                    node_id, "KSampler", "value_bigger_than_max" if denoise > 1 else
                    "value_smaller_than_min", "Value out of range",
                    f"denoise: {denoise}", outputs))
            if node["class_type"] == "LoadImage" and node["inputs"].get("image") \
                    not in self.uploads:
                # nodes.py LoadImage.VALIDATE_INPUTS
                node_errors.update(self._node_error(
                    node_id, "LoadImage", "custom_validation_failed",
                    "Custom validation failed for node",
                    f"image - Invalid image file: {node['inputs'].get('image')}", outputs))
        if node_errors:
            return self._error("prompt_outputs_failed_validation",
                               "Prompt outputs failed validation", "", node_errors)
        if self.partial_node_errors:
            # validate_prompt: some outputs invalid, others good -> 200, the good run.
            node_errors = self._node_error(
                "11", "CheckpointLoaderSimple", "value_not_in_list", "Value not in list",
                "ckpt_name: 'sdxl.safetensors' not in ['v1-5-pruned-emaonly.safetensors']",
                ["12"])
        self.number += 1
        extra = {"client_id": body["client_id"]} if "client_id" in body else {}
        self.prompts[prompt_id] = workflow
        self.polls[prompt_id] = 0
        if not self.vanish:  # else: deleted by someone else before we ever look
            self.items[prompt_id] = [self.number, prompt_id, workflow, extra, outputs]
            self.pending.append(prompt_id)
            self._advance()
        return web.json_response({"prompt_id": prompt_id, "number": self.number,
                                  "node_errors": node_errors})

    # ---- the queue
    def _advance(self) -> None:
        """main.py prompt_worker: one prompt runs at a time, the next when it is done."""
        if self.running is None and not self.busy and self.pending:
            self.running = self.pending.pop(0)

    def _finish(self, prompt_id: str, messages: list[list[Any]], outputs: dict[str, Any],
                ok: bool) -> None:
        """PromptQueue.task_done: the history entry, and the next prompt runs."""
        item = self.items.pop(prompt_id)
        ts = int(time.time() * 1000)
        start = [["execution_start", {"prompt_id": prompt_id, "timestamp": ts}],
                 ["execution_cached", {"nodes": [], "prompt_id": prompt_id, "timestamp": ts}]]
        self.history_entries[prompt_id] = {
            "prompt": item, "outputs": outputs,
            "status": {"status_str": "success" if ok else "error", "completed": ok,
                       "messages": start + messages},
            "meta": {k: {"node_id": k, "display_node": k, "parent_node": None,
                         "real_node_id": k} for k in outputs}}
        if self.running == prompt_id:
            self.running = None
        self._advance()

    def _interrupt_running(self) -> None:
        """nodes.interrupt_processing: the running prompt ends with
        ``execution_interrupted`` (execution.py handle_execution_error)."""
        if self.busy:
            self.foreign_interrupted += 1
            return
        prompt_id = self.running
        if prompt_id is None:
            return
        workflow = self.prompts[prompt_id]
        node_id = next((k for k, n in workflow.items() if n["class_type"] == "KSampler"),
                       next(iter(workflow)))
        self._finish(prompt_id, [["execution_interrupted", {
            "prompt_id": prompt_id, "node_id": node_id,
            "node_type": workflow[node_id]["class_type"],
            "executed": [], "timestamp": int(time.time() * 1000)}]], {}, ok=False)

    def _run(self, prompt_id: str) -> dict[str, Any]:
        """SaveImage/PreviewImage outputs: ``{prefix}_{counter:05}_.png``, one per latent,
        the size the workflow asked for."""
        workflow = self.prompts[prompt_id]
        inputs = {k: v for node in workflow.values() for k, v in node["inputs"].items()}
        count, seed = int(inputs["amount"]), int(inputs["seed"])
        w, h = int(inputs["width"]), int(inputs["height"])
        outputs: dict[str, Any] = {}
        for node_id, node in workflow.items():
            kind = {"SaveImage": "output", "PreviewImage": "temp"}.get(node["class_type"])
            if kind is None:
                continue
            prefix = node["inputs"].get("filename_prefix", "ComfyUI") if kind == "output" \
                else "ComfyUI_temp_abcde"
            sub, _, prefix = prefix.rpartition("/")
            images = []
            for i in range(count):
                self.counter += 1
                name = f"{prefix}_{self.counter:05}_.png"
                self.files[(kind, sub, name)] = self.make_image(w, h, seed + i)
                images.append({"filename": name, "subfolder": sub, "type": kind})
            outputs[node_id] = {"images": images}
        return outputs

    async def history(self, request: web.Request) -> web.Response:
        """``{}`` until the run is done (and for an id it never had), then the entry."""
        prompt_id = request.match_info["prompt_id"]
        if prompt_id in self.polls:
            self.polls[prompt_id] += 1
            if self.running == prompt_id and self.polls[prompt_id] > self.pending_polls:
                self._complete(prompt_id)
        entry = self.history_entries.get(prompt_id)
        if entry is None:
            return web.json_response({})
        if self.status_as_string:  # and no outputs: nothing the gateway can use
            return web.json_response({prompt_id: {"status": "success", "outputs": {}}})
        return web.json_response({prompt_id: entry})

    def _complete(self, prompt_id: str) -> None:
        ts = int(time.time() * 1000)
        if self.interrupted:
            self._interrupt_running()
        elif self.execution_error:
            self._finish(prompt_id, [["execution_error", {
                "prompt_id": prompt_id, "node_id": "8", "node_type": "KSampler",
                "executed": ["1", "2", "3"], "exception_message": OOM_MESSAGE,
                "exception_type": "torch.OutOfMemoryError",
                "traceback": [TRACEBACK_LINE], "current_inputs": {"seed": [7]},
                "current_outputs": ["1", "2"], "timestamp": ts}]], {}, ok=False)
        else:
            self._finish(prompt_id, [["execution_success", {"prompt_id": prompt_id,
                                                            "timestamp": ts}]],
                         self._run(prompt_id), ok=True)

    async def post_history(self, request: web.Request) -> web.Response:
        body = request[REC].json or {}
        if body.get("clear"):
            self.history_entries.clear()
        for prompt_id in body.get("delete", []):
            self.history_deleted.append(prompt_id)
            self.history_entries.pop(prompt_id, None)
        return web.Response(status=200)

    async def get_queue(self, request: web.Request) -> web.Response:
        running = [self.items[self.running]] if self.running else []
        if self.busy:
            running = [[0, self.FOREIGN, {}, {}, []]]
        return web.json_response({"queue_running": running,
                                  "queue_pending": [self.items[p] for p in self.pending]})

    async def post_queue(self, request: web.Request) -> web.Response:
        """Deletes pending items only; a running prompt is untouched. 200, empty body."""
        await self._stall()
        body = request[REC].json or {}
        if body.get("clear"):
            for prompt_id in self.pending:
                self.items.pop(prompt_id, None)
            self.pending.clear()
        for prompt_id in body.get("delete", []):
            self.deleted.append(prompt_id)
            if prompt_id in self.pending:
                self.pending.remove(prompt_id)
                self.items.pop(prompt_id, None)
        return web.Response(status=200)

    async def interrupt(self, request: web.Request) -> web.Response:
        """Since 2025-09 (PR 9607) a ``prompt_id`` limits it to that prompt, and only
        while it runs; before, and without one, whatever runs is stopped."""
        await self._stall()
        body = request[REC].json
        self.interrupts.append(body)
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        if self.old_server or not prompt_id or (prompt_id == self.running and not self.busy):
            self._interrupt_running()
        return web.Response(status=200)

    async def cancel_job(self, request: web.Request) -> web.Response:
        """PR 14493 (2026-06): cancel one job, running or pending; an unknown or
        finished id is a 200 that did nothing. Absent on older servers."""
        await self._stall()
        if self.old_server:
            return web.Response(status=404, text="404: Not Found")
        prompt_id = request.match_info["job_id"]
        self.job_cancels.append(prompt_id)
        if prompt_id == self.running and not self.busy:
            self._interrupt_running()
            return web.json_response({"job_id": prompt_id, "cancelled": True})
        if prompt_id in self.pending:
            self.pending.remove(prompt_id)
            self.items.pop(prompt_id, None)
            return web.json_response({"job_id": prompt_id, "cancelled": True})
        return web.json_response({"job_id": prompt_id, "cancelled": False})

    # ---- view
    async def view(self, request: web.Request) -> web.Response:
        """``type`` defaults to output (temp: previews); a name with ``..`` or a leading
        ``/`` is a 400, a subfolder outside the folder a 403, a missing file a 404."""
        q = request.query
        if "filename" not in q:
            return web.Response(status=404)
        filename = q["filename"]
        if not filename or filename[0] == "/" or ".." in filename:
            return web.Response(status=400)
        kind = q.get("type", "output")
        if kind not in ("input", "temp", "output"):
            return web.Response(status=400)
        sub = q.get("subfolder", "")
        if _escapes("/" + kind, sub):
            return web.Response(status=403)
        body = self.files.get((kind, posixpath.normpath(sub) if sub else "",
                               posixpath.basename(filename)))
        if body is None:
            return web.Response(status=404)
        return web.Response(body=body, content_type="image/png",
                            headers={"Content-Disposition": f'filename="{filename}"'})
