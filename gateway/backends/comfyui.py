"""``kind: comfyui``: a user-supplied ComfyUI workflow, queued over ComfyUI's HTTP API.

Upload the source (``POST /upload/image``), queue the workflow template with its
placeholders filled (``POST /prompt``), poll ``GET /history/{prompt_id}`` until it is
done, fetch each output with ``GET /view``, then delete our history entry
(``POST /history``) so a busy ComfyUI does not keep every run forever. Polling rather
than the websocket keeps one code path for every ComfyUI version and every reverse
proxy; the poll interval is small next to a diffusion run.

What ComfyUI does that the adapter must not mistake for progress (Comfy-Org/ComfyUI
``server.py`` and ``execution.py``; /work/shared/reference/backends.md):

* ``POST /prompt`` answers 200 with non-empty ``node_errors`` when only some outputs
  validated; only those would run, so the run is cancelled and the call fails.
* ``GET /history/{id}`` is ``{}`` both while the prompt waits and when nobody will ever
  run it (deleted from the queue by someone else, a restarted server). A prompt found
  in neither the history nor ``GET /queue`` for ``vanished_grace_seconds`` has vanished:
  a clear 502 now rather than a timeout minutes later.
* A failed run is a history entry whose ``status.messages`` hold ``execution_error``
  (node, exception) or ``execution_interrupted``.

A request that is given up on (timeout, client gone) is cancelled in ComfyUI so it does
not burn GPU time for nobody: ``POST /api/jobs/{id}/cancel`` where the server has it;
else ``POST /queue {"delete"}`` and, only when ``GET /queue`` shows our prompt running,
``POST /interrupt {"prompt_id"}`` (servers before 2025-09 ignore the id and interrupt
whatever runs, which is why it is sent only when that is ours).

Placeholders are JSON strings: ``"{{seed}}"``, ``"{{batch_size}}"``, ``"{{width}}"``,
``"{{height}}"``, ``"{{strength}}"`` become numbers, ``"{{image}}"``, ``"{{prompt}}"``,
``"{{negative_prompt}}"`` strings (also inside longer strings). A request's variation
controls fill ``{{strength}}`` (else the ``strength`` option), ``{{seed}}`` and
``{{prompt}}`` (the hint appended to the ``prompt`` option); the backend honours a
control only if its workflow has that placeholder.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import aiohttp
import structlog

from gateway.backends.base import (
    DEFAULT_TIMEOUTS,
    BackendError,
    BackendOptions,
    Controls,
    Timeouts,
    bad_response,
)
from gateway.backends.http import HttpBackend, HttpOptions, gather_all, strip_userinfo
from gateway.backends.normalise import to_pngs
from gateway.generation import Generation, VariationRequest, with_hint

log = structlog.get_logger("gateway.backends.comfyui")
_PLACEHOLDER = re.compile(
    r"\{\{(image|seed|batch_size|width|height|strength|prompt|negative_prompt)\}\}")
_NUMERIC = frozenset({"seed", "batch_size", "width", "height", "strength"})
# Upstream text shown to clients or logged: control characters (line breaks included)
# become spaces, URLs are dropped, and the length is capped.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)
_CLIENT_TEXT = 160
_LOG_TEXT = 500
_SMALL_BODY = 1 << 16


@dataclass(frozen=True)
class ComfyUIOptions(HttpOptions):
    """``workflow`` is an API-format workflow JSON (ComfyUI: *Export (API)*);
    ``api_key`` is sent as a bearer token, for a ComfyUI behind an authenticating proxy.
    ``vanished_grace_seconds``: how long a prompt may be in neither the queue nor the
    history (the moment between the two, a server briefly busy) before it counts as
    lost. ``cancel_timeout_seconds`` bounds the clean-up of an abandoned prompt."""

    base_url: str
    workflow: str
    api_key: str = field(default="", repr=False)
    native_size: int = 512
    prompt: str = ""
    negative_prompt: str = ""
    # What ``{{strength}}`` becomes when a request sets none (e.g. KSampler's denoise).
    strength: float = 0.55
    poll_interval_seconds: float = 0.25
    vanished_grace_seconds: float = 2.0
    cancel_timeout_seconds: float = 5.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.native_size < 64 or self.native_size % 8:
            raise ValueError("native_size must be a multiple of 8, at least 64")
        if self.poll_interval_seconds <= 0:
            raise ValueError("poll_interval_seconds must be positive")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError("strength must be between 0 and 1")
        if self.vanished_grace_seconds <= 0:
            raise ValueError("vanished_grace_seconds must be positive")
        if self.cancel_timeout_seconds <= 0:
            raise ValueError("cancel_timeout_seconds must be positive")


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


def untrusted(value: Any, limit: int) -> str:
    """Upstream text made fit to show: a string, on one line, without URLs, at most
    ``limit`` characters. Anything else (a list, a number from a fork) is dropped."""
    if not isinstance(value, str):
        return ""
    text = _URL.sub("<url>", _CONTROL.sub(" ", value))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


class ComfyUIBackend(HttpBackend[ComfyUIOptions]):
    kind: ClassVar[str] = "comfyui"
    options_class: ClassVar[type[BackendOptions]] = ComfyUIOptions

    def __init__(self, name: str, options: ComfyUIOptions,
                 timeouts: Timeouts = DEFAULT_TIMEOUTS) -> None:
        super().__init__(name, options, timeouts)
        self.template, self._digest = load_workflow(options.workflow)
        used = set(_PLACEHOLDER.findall(json.dumps(self.template)))
        self._controls = Controls(strength=options.strength if "strength" in used else None,
                                  seed="seed" in used, prompt="prompt" in used)
        self.client_id = uuid.uuid4().hex
        self._cleanups: set[asyncio.Task[None]] = set()

    @property
    def controls(self) -> Controls:
        """Those whose placeholder the workflow has."""
        return self._controls

    @property
    def identity(self) -> str:
        """What the pooled images depend on. The default strength only where the workflow
        has a ``{{strength}}`` to fill: a workflow without one keeps the key (and pools)
        it had before controls existed."""
        o = self.options
        strength = "" if self._controls.strength is None else f":{o.strength:g}"
        return (f"comfyui:{strip_userinfo(self.base_url)}:{self._digest}:{o.native_size}:"
                f"{o.prompt}:{o.negative_prompt}{strength}")

    def headers(self) -> dict[str, str]:
        headers = super().headers()
        if self.options.api_key:
            headers["Authorization"] = f"Bearer {self.options.api_key}"
        return headers

    async def close(self) -> None:
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)
        await super().close()

    # ------------------------------------------------------------------ the run

    async def generate(self, request: VariationRequest) -> Generation:
        image = await self._upload(request)
        # Our own id (a canonical UUID, as newer servers require): a prompt whose
        # POST /prompt is cut off can still be cancelled by it.
        prompt_id = str(uuid.uuid4())
        try:
            prompt_id, node_errors = await self._queue(request, image, prompt_id)
            if node_errors:
                raise self._partial(node_errors, request.request_id)
            outputs = await self._wait(prompt_id, request.request_id)
        except asyncio.CancelledError:  # deadline passed or the client left
            self._background(self._cancel(prompt_id, request.request_id))
            raise
        except _Finished as done:  # failed, but the history entry exists: ours to drop
            self._background(self._delete_history(prompt_id))
            raise done.error from None
        except BackendError:
            # It may be queued or running still (a cut-off POST /prompt, partial
            # node_errors, a failed poll), and the router may queue a fresh one.
            self._background(self._cancel(prompt_id, request.request_id))
            raise
        try:
            images = await gather_all(*(self._fetch(i) for i in self._pick(outputs, request.n)))
        finally:
            self._background(self._delete_history(prompt_id))
        return Generation(await to_pngs(self.name, images, request.size))

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

    async def _queue(self, request: VariationRequest, image: str, prompt_id: str
                     ) -> tuple[str, Any]:
        """The id ComfyUI queued the run under (a fork may pick its own) and its
        ``node_errors``."""
        o = self.options
        workflow = fill(self.template, {
            "image": image, "seed": request.seed, "batch_size": request.n,
            "width": o.native_size, "height": o.native_size,
            "strength": o.strength if request.strength is None else request.strength,
            "prompt": with_hint(o.prompt, request.prompt),
            "negative_prompt": o.negative_prompt})
        answer = await self.request_json("POST", "/prompt", json={
            "prompt": workflow, "client_id": self.client_id, "prompt_id": prompt_id})
        given = answer.get("prompt_id") if isinstance(answer, dict) else None
        if not isinstance(given, str) or not given:
            raise bad_response(self.name, "no prompt_id")
        return given, answer.get("node_errors")

    def _partial(self, node_errors: Any, request_id: str) -> BackendError:
        """A 200 with ``node_errors``: only the outputs that validated would run, which
        is not the workflow we were given (generate cancels what was queued)."""
        summary = self._scrub(_node_error_summary(node_errors), _LOG_TEXT)
        log.warning("comfyui_node_errors", backend=self.name, request_id=request_id,
                    nodes=summary)
        return BackendError(
            502, f"Backend {self.name!r}: ComfyUI rejected part of the workflow "
            f"({untrusted(summary, _CLIENT_TEXT) or 'node errors'}).",
            code="upstream_rejected", kind="workflow_invalid", trips_breaker=False)

    async def _wait(self, prompt_id: str, request_id: str) -> dict[str, Any]:
        """Poll the history until the run is done; ``_Finished`` if it failed."""
        loop = asyncio.get_running_loop()
        o = self.options
        # GET /queue lists every queued workflow in full: asked only while the history
        # is silent, and no more often than the grace period needs.
        queue_every = max(o.poll_interval_seconds, o.vanished_grace_seconds / 4)
        last_seen = last_queue_check = loop.time()  # it was queued just now
        misses = 0  # queue checks in a row that did not find it
        while True:
            history = await self.request_json("GET", f"/history/{prompt_id}")
            entry = history.get(prompt_id) if isinstance(history, dict) else None
            if isinstance(entry, dict):
                last_seen, misses = loop.time(), 0
                outputs = self._outcome(entry, request_id)
                if outputs is not None:
                    return outputs
            elif loop.time() - last_queue_check >= queue_every:
                last_queue_check = now = loop.time()
                try:
                    state = await self._queued(prompt_id)
                except BackendError:  # a proxy that does not pass /queue: no verdict
                    state = "unknown"
                if state is not None:
                    last_seen, misses = now, 0
                else:
                    # Two misses in a row, with a history poll between: a run that
                    # finished between our two GETs is not taken for a lost one.
                    misses += 1
                    if misses >= 2 and now - last_seen >= o.vanished_grace_seconds:
                        log.warning("comfyui_prompt_vanished", backend=self.name,
                                    request_id=request_id)
                        raise BackendError(
                            502, f"Backend {self.name!r}: the prompt vanished from the "
                            "ComfyUI queue (deleted by someone else, or the server "
                            "restarted).", code="upstream_error", kind="prompt_vanished")
            await asyncio.sleep(o.poll_interval_seconds)

    def _outcome(self, entry: dict[str, Any], request_id: str) -> dict[str, Any] | None:
        """The outputs of a finished run, ``None`` while it is not finished; raises
        ``_Finished`` when it failed."""
        # Forks and proxies vary: a status that is not an object says nothing.
        status = entry.get("status")
        if not isinstance(status, dict):
            status = {}
        messages = status.get("messages")
        # [[event, data], ...] in the order the run sent them.
        events = {m[0]: m[1] for m in messages if isinstance(m, list) and len(m) == 2
                  and isinstance(m[0], str) and isinstance(m[1], dict)
                  } if isinstance(messages, list) else {}
        if "execution_error" in events:
            raise _Finished(self._execution_error(events["execution_error"], request_id))
        if "execution_interrupted" in events:
            data = events["execution_interrupted"]
            log.warning("comfyui_execution_interrupted", backend=self.name,
                        request_id=request_id, node_id=untrusted(data.get("node_id"), 64),
                        node_type=untrusted(data.get("node_type"), 100))
            raise _Finished(BackendError(
                502, f"Backend {self.name!r}: the ComfyUI run was interrupted.",
                code="upstream_error", kind="workflow_interrupted"))
        if status.get("status_str") == "error":
            log.warning("comfyui_execution_error", backend=self.name, request_id=request_id)
            raise _Finished(BackendError(
                502, f"Backend {self.name!r}: the ComfyUI workflow failed.",
                code="upstream_error", kind="workflow_error"))
        outputs = entry.get("outputs")
        if status.get("completed", True) and isinstance(outputs, dict):
            return outputs
        return None

    def _scrub(self, value: Any, limit: int) -> str:
        """:func:`untrusted`, and never our key or the upstream's address (a proxy or a
        custom node may quote them)."""
        text = untrusted(value, max(limit, _LOG_TEXT))
        host = urlsplit(self.base_url).netloc
        for secret in (self.options.api_key, strip_userinfo(self.base_url), host):
            if secret:
                text = text.replace(secret, "<redacted>")
        return untrusted(text, limit)

    def _execution_error(self, data: dict[str, Any], request_id: str) -> BackendError:
        """Node and exception in the log (never the traceback or the inputs); a short,
        cleaned summary for the client."""
        node_type = untrusted(data.get("node_type"), 100)
        exc_type = untrusted(data.get("exception_type"), 100)
        message = data.get("exception_message")
        log.warning("comfyui_execution_error", backend=self.name, request_id=request_id,
                    node_id=untrusted(data.get("node_id"), 64), node_type=node_type,
                    exception_type=exc_type, exception_message=self._scrub(message, _LOG_TEXT))
        where = f" in node {node_type}" if node_type else ""
        short = self._scrub(message, _CLIENT_TEXT)
        if short and exc_type:
            short = f"{exc_type.rpartition('.')[2]}: {short}"
        detail = f" ({short})" if short else ""
        return BackendError(502, f"Backend {self.name!r}: the ComfyUI workflow failed"
                            f"{where}{detail}.", code="upstream_error", kind="workflow_error")

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

    # ------------------------------------------------------------------ clean-up

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run clean-up beside the request: it must not delay the answer, and it must
        outlive a cancelled request. ``close`` waits for what is left."""
        task = asyncio.get_running_loop().create_task(work)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _quiet(self, method: str, path: str, **kwargs: Any) -> tuple[int, bytes] | None:
        """One best-effort exchange: ``(status, body)``, or ``None`` if it failed.
        Clean-up has nobody to report to; a failure is logged by the caller."""
        session = self._session
        if session is None:
            return None
        try:
            async with session.request(method, self.base_url + path, headers=self.headers(),
                                       allow_redirects=False, **kwargs) as resp:
                return resp.status, await resp.content.read(_SMALL_BODY)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def _queued(self, prompt_id: str) -> str | None:
        """``"running"`` or ``"pending"`` as ``GET /queue`` lists our prompt, else
        ``None``. Items are ``[number, prompt_id, prompt, extra_data, outputs]``."""
        answer = await self.request_json("GET", "/queue")
        if not isinstance(answer, dict):
            raise bad_response(self.name, "queue answer is not an object")
        for state in ("running", "pending"):
            items = answer.get(f"queue_{state}")
            if isinstance(items, list) and any(
                    isinstance(item, list) and len(item) > 1 and item[1] == prompt_id
                    for item in items):
                return state
        return None

    async def _cancel(self, prompt_id: str, request_id: str) -> None:
        """Stop an abandoned prompt, best effort, within ``cancel_timeout_seconds``."""
        how = "failed"
        try:
            async with asyncio.timeout(self.options.cancel_timeout_seconds):
                # Newer servers: one call for pending and running alike, interrupting
                # only this prompt (an unknown or finished id is a 200 too).
                answer = await self._quiet("POST", f"/api/jobs/{prompt_id}/cancel")
                if answer is not None and 200 <= answer[0] < 300:
                    how = "jobs_api"
                    return
                # Older servers (404/405 there): take it out of the queue; interrupt
                # only if it is the one running, since before 2025-09 /interrupt
                # stopped whatever ran, other clients' work included.
                await self._quiet("POST", "/queue", json={"delete": [prompt_id]})
                how = "queue_delete"
                if await self._queued(prompt_id) == "running":
                    await self._quiet("POST", "/interrupt", json={"prompt_id": prompt_id})
                    how = "interrupt"
        except (BackendError, TimeoutError):
            pass
        finally:
            log.info("comfyui_prompt_cancelled", backend=self.name, request_id=request_id,
                     how=how)

    async def _delete_history(self, prompt_id: str) -> None:
        """Drop our finished run from ComfyUI's history (it keeps up to 10 000)."""
        try:
            async with asyncio.timeout(self.options.cancel_timeout_seconds):
                answer = await self._quiet("POST", "/history", json={"delete": [prompt_id]})
        except TimeoutError:
            answer = None
        if answer is None or not 200 <= answer[0] < 300:
            log.info("comfyui_history_delete_failed", backend=self.name)


class _Finished(Exception):
    """The run ended in failure with a history entry; carries the client's error."""

    def __init__(self, error: BackendError) -> None:
        super().__init__(error.message)
        self.error = error


def _node_error_summary(node_errors: Any) -> str:
    """``node 8 (KSampler): Value not in list: ...`` for the first node in error."""
    if not isinstance(node_errors, dict):
        return ""
    for node_id, info in sorted(node_errors.items(), key=lambda kv: str(kv[0])):
        if not isinstance(info, dict):
            continue
        errors = info.get("errors")
        first = errors[0] if isinstance(errors, list) and errors else {}
        if not isinstance(first, dict):
            first = {}
        message = ": ".join(t for t in (untrusted(first.get("message"), 100),
                                        untrusted(first.get("details"), 200)) if t)
        class_type = untrusted(info.get("class_type"), 100)
        label = f"node {untrusted(str(node_id), 32)}" + (f" ({class_type})" if class_type else "")
        return f"{label}: {message}" if message else label
    return ""


def _node_images(node: Any) -> list[Any]:
    """A history output node's ``images`` list; nodes without one (text, latents) or of
    another shape contribute nothing."""
    images = node.get("images") if isinstance(node, dict) else None
    return images if isinstance(images, list) else []


def _text(value: Any) -> str:
    """A query value from history: only strings are passed on."""
    return value if isinstance(value, str) else ""
