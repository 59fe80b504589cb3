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
import io
import json
import struct
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from PIL import Image

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
            return web.json_response({"error": {"message": f"boom (auth was {echo})",
                                                "type": "server_error"}}, status=500)
        if fault == "503":
            headers = {"retry-after": self.retry_after}
            if self.retry_after_ms is not None:
                headers["retry-after-ms"] = self.retry_after_ms
            return web.json_response({"error": {"message": f"overloaded {echo}"}},
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
    def make_image(self, width: int, height: int, index: int) -> bytes:
        """An output image, with an image fault applied if one is switched on."""
        fault = self._take(IMAGE_FAULTS)
        if fault == "wrong_size":
            return image_bytes(300, 200, index)
        if fault == "not_png":
            return image_bytes(width, height, index, "GIF")
        if fault == "corrupt_idat":
            return corrupt_idat_png(width, height)
        data = image_bytes(width, height, index)
        if fault == "truncated_b64":
            return data[: len(data) // 2]
        if fault == "trailing_bytes":
            return data + b"\x00\x00"
        return data

    def b64_image(self, width: int, height: int, index: int) -> str:
        return base64.b64encode(self.make_image(width, height, index)).decode()


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
    """``POST /v1/images/variations`` as OpenAI documented it; URLs served at /files/."""

    main_path = "/v1/images/variations"

    def __init__(self, api_key: str | None = None) -> None:
        super().__init__(api_key)
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
        unknown = set(rec.fields) - {"model", "n", "size", "response_format", "user"}
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


class OpenAIEditsFake(OpenAIModelsFake):
    """``POST /v1/images/edits`` for gpt-image: base64 only, 1024 px and larger."""

    main_path = "/v1/images/edits"
    EDIT_SIZES = {"1024x1024": (1024, 1024), "1536x1024": (1536, 1024),
                  "1024x1536": (1024, 1536), "auto": (1024, 1024)}

    def __init__(self, api_key: str | None = None) -> None:
        super().__init__(api_key)
        self.app.router.add_post(self.main_path, self.edits)

    async def edits(self, request: web.Request) -> web.Response:
        rec: Recorded = request[REC]
        image = rec.files.get("image") or rec.files.get("image[]")
        if image is None:
            return reject(400, "'image' is a required property")
        if not (_is_png(image[2]) or image[2][:3] == b"\xff\xd8\xff"):
            return reject(400, "Invalid image file or mode.")
        if not rec.fields.get("prompt"):
            return reject(400, "'prompt' is a required property")
        if not rec.fields.get("model", "").startswith("gpt-image"):
            return reject(400, "Invalid model for edits.", "invalid_value")
        n = int(rec.fields.get("n", "1"))
        size = rec.fields.get("size", "auto")
        if not 1 <= n <= 10 or size not in self.EDIT_SIZES:
            return reject(400, "Invalid value.", "invalid_value")
        if rec.fields.get("quality", "auto") not in ("low", "medium", "high", "auto"):
            return reject(400, "Invalid quality.", "invalid_value")
        w, h = self.EDIT_SIZES[size]
        offset = len(self.calls()) * 100
        return web.json_response({
            "created": int(time.time()),
            "data": [{"b64_json": self.b64_image(w, h, offset + i)} for i in range(n)],
            "usage": {"input_tokens": 50, "output_tokens": 272 * n, "total_tokens": 50 + 272 * n,
                      "input_tokens_details": {"text_tokens": 10, "image_tokens": 40}},
        })


class SdWebUIFake(FakeUpstream):
    """AUTOMATIC1111/Forge ``--api`` with optional ``--api-auth user:pass``."""

    main_path = "/sdapi/v1/img2img"
    REQUIRED = {"init_images", "denoising_strength", "prompt", "steps", "cfg_scale",
                "width", "height", "batch_size", "seed", "sampler_name"}

    def __init__(self, basic: tuple[str, str] | None = None) -> None:
        super().__init__(None)
        self.basic = basic
        self.app.router.add_post(self.main_path, self.img2img)
        self.app.router.add_get("/sdapi/v1/progress", self.progress)

    def check_auth(self, request: web.Request) -> web.Response | None:
        if self.basic is None:
            return None
        expected = "Basic " + base64.b64encode(":".join(self.basic).encode()).decode()
        given = request.headers.get("Authorization", "")
        if given != expected:
            # FastAPI's HTTPBasic answer, plus an echo of what was sent.
            return web.json_response({"detail": f"Incorrect credentials {given}"}, status=401,
                                     headers={"WWW-Authenticate": "Basic"})
        return None

    async def img2img(self, request: web.Request) -> web.Response:
        body = request[REC].json
        if not isinstance(body, dict) or self.REQUIRED - set(body):
            return web.json_response({"detail": "missing fields"}, status=422)
        try:
            init = base64.b64decode(body["init_images"][0], validate=True)
        except (binascii.Error, IndexError, TypeError):
            return web.json_response({"detail": "bad init image"}, status=422)
        if not _is_png(init) or not 0 <= body["denoising_strength"] <= 1:
            return web.json_response({"detail": "bad init image or strength"}, status=422)
        w, h, count, seed = body["width"], body["height"], body["batch_size"], body["seed"]
        images = [self.b64_image(w, h, seed + i) for i in range(count)]
        params = {k: v for k, v in body.items() if k != "init_images"}
        info = {"seed": seed, "all_seeds": [seed + i for i in range(count)],
                "width": w, "height": h}
        return web.json_response({"images": images, "parameters": params,
                                  "info": json.dumps(info)})

    async def progress(self, request: web.Request) -> web.Response:
        return web.json_response({"progress": 0.0, "eta_relative": 0.0, "state": {}})


class ComfyUIFake(FakeUpstream):
    """ComfyUI's HTTP API: upload, prompt, history (pending for a few polls), view."""

    main_path = "/prompt"

    def __init__(self, api_key: str | None = None, pending_polls: int = 2) -> None:
        super().__init__(api_key)
        self.pending_polls = pending_polls
        self.uploads: dict[str, bytes] = {}
        self.outputs: dict[str, bytes] = {}
        self.prompts: dict[str, dict[str, Any]] = {}
        self.polls: dict[str, int] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self.deleted: list[str] = []
        self.workflow_error = False
        self.status_as_string = False  # a fork or proxy answering "status": "success"
        r = self.app.router
        r.add_post("/upload/image", self.upload)
        r.add_post("/prompt", self.prompt)
        r.add_get("/history/{prompt_id}", self.history)
        r.add_get("/view", self.view)
        r.add_post("/queue", self.queue)
        r.add_post("/interrupt", self.interrupt)

    async def upload(self, request: web.Request) -> web.Response:
        rec: Recorded = request[REC]
        image = rec.files.get("image")
        if image is None:
            return web.Response(status=400)
        self.uploads[image[0]] = image[2]
        return web.json_response({"name": image[0], "subfolder": "", "type": "input"})

    async def prompt(self, request: web.Request) -> web.Response:
        body = request[REC].json
        workflow = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(workflow, dict):
            return web.json_response({"error": {"type": "no_prompt"}, "node_errors": {}},
                                     status=400)
        loads = [n for n in workflow.values() if n.get("class_type") == "LoadImage"]
        if not loads or loads[0]["inputs"]["image"] not in self.uploads:
            return web.json_response({"error": {"type": "prompt_outputs_failed_validation",
                                                "message": "image not uploaded"},
                                      "node_errors": {}}, status=400)
        for node in workflow.values():
            for key, value in node["inputs"].items():
                if isinstance(value, str) and "{{" in value:
                    return web.json_response({"error": {"type": "unfilled " + key},
                                              "node_errors": {}}, status=400)
        prompt_id = str(uuid.uuid4())
        self.prompts[prompt_id] = workflow
        self.polls[prompt_id] = 0
        return web.json_response({"prompt_id": prompt_id, "number": len(self.prompts),
                                  "node_errors": {}})

    def _run(self, prompt_id: str) -> dict[str, Any]:
        workflow = self.prompts[prompt_id]
        inputs = {k: v for node in workflow.values() for k, v in node["inputs"].items()}
        count, seed = int(inputs["amount"]), int(inputs["seed"])
        w, h = int(inputs["width"]), int(inputs["height"])
        images = []
        for i in range(count):
            name = f"variations-gateway_{prompt_id[:8]}_{i:05}_.png"
            self.outputs[name] = self.make_image(w, h, seed + i)
            images.append({"filename": name, "subfolder": "", "type": "output"})
        return {"10": {"images": images}}

    async def history(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        if prompt_id not in self.prompts:
            return web.json_response({})
        self.polls[prompt_id] += 1
        if self.polls[prompt_id] <= self.pending_polls:
            return web.json_response({})  # still queued or running
        if self.workflow_error:
            status = {"status_str": "error", "completed": False, "messages": []}
            return web.json_response({prompt_id: {"outputs": {}, "status": status}})
        if prompt_id not in self.results:
            self.results[prompt_id] = self._run(prompt_id)
        if self.status_as_string:  # and no outputs: nothing the gateway can use
            return web.json_response({prompt_id: {"status": "success", "outputs": {}}})
        entry = self.results[prompt_id]
        return web.json_response({prompt_id: {
            "prompt": [1, prompt_id, {}, {}, ["10"]], "outputs": entry,
            "status": {"status_str": "success", "completed": True, "messages": []}}})

    async def view(self, request: web.Request) -> web.Response:
        q = request.query
        if q.get("type") != "output" or "subfolder" not in q:
            return web.Response(status=400)
        body = self.outputs.get(q.get("filename", ""))
        if body is None:
            return web.Response(status=404)
        return web.Response(body=body, content_type="image/png")

    async def queue(self, request: web.Request) -> web.Response:
        body = request[REC].json or {}
        self.deleted += body.get("delete", [])
        return web.json_response({})

    async def interrupt(self, request: web.Request) -> web.Response:
        return web.json_response({})
