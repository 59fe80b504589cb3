"""A test-only backend kind that counts and gates its calls.

It is registered for one test at a time by the ``instrumented`` fixture, which puts a
new ``gateway.backends.KINDS`` mapping (the registry is a read-only MappingProxy, so it
is replaced, never mutated) in place with ``monkeypatch``. The product's registry holds
no test code; the app builds this backend through the normal config -> registry path,
and a test reaches the instance with ``app[ROUTER].backends[name]``.

Images are tiny flat PNGs derived from (source pixels, size, seed + i), so they are
deterministic and distinct per pool position like a real backend's.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from PIL import Image
from support import auth

from gateway import backends
from gateway.backends.base import (
    BackendError,
    BackendOptions,
    BackendState,
    Controls,
    Timeouts,
)
from gateway.generation import Generation, VariationRequest
from gateway.keys import ROUTER

KIND = "instrumented"
IMPORT_PATH = "instrumented_backend:InstrumentedBackend"


@dataclass(frozen=True)
class InstrumentedOptions(BackendOptions):
    """``fail: true`` makes every call raise a retryable 502 ``BackendError``."""

    fail: bool = False


class InstrumentedBackend:
    kind: ClassVar[str] = KIND
    options_class: ClassVar[type[BackendOptions]] = InstrumentedOptions

    def __init__(self, name: str, options: InstrumentedOptions, timeouts: Timeouts) -> None:
        self.name = name
        self.options = options
        self.calls: list[int] = []  # n of every call that reached the backend
        self.requests: list[VariationRequest] = []
        self.in_flight = 0
        self.peak = 0
        # Calls wait here; tests clear it to hold calls at the backend.
        self.gate = asyncio.Event()
        self.gate.set()

    @property
    def controls(self) -> Controls:
        return Controls(strength=0.5, seed=True, prompt=True)

    @property
    def identity(self) -> str:
        return f"{KIND}:v1"

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def check(self) -> BackendState:
        return BackendState(self.name, KIND, True)

    async def generate(self, request: VariationRequest) -> Generation:
        self.calls.append(request.n)
        self.requests.append(request)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await self.gate.wait()
            if self.options.fail:
                raise BackendError(502, "instrumented backend failure", kind="http_5xx",
                                   trips_breaker=False)
            return Generation([_image(request, i) for i in range(request.n)])
        finally:
            self.in_flight -= 1


def _image(request: VariationRequest, i: int) -> bytes:
    digest = hashlib.sha256(
        f"{request.image.pixels_sha256}:{request.size}:{request.seed + i}:"
        f"{request.strength}:{request.prompt}".encode()).digest()
    img = Image.new("RGB", (request.size, request.size), tuple(digest[:3]))
    img.putpixel((0, 0), tuple(digest[3:6]))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- test helpers

Start = Callable[..., Awaitable[tuple[TestClient, InstrumentedBackend]]]


def register(monkeypatch: pytest.MonkeyPatch, gateway_client: Any) -> Start:
    """Register the kind for this test; the returned ``await start(fail=False,
    pricing=None, **sections)`` gives (client, backend) for an in-process gateway routed
    to it (``pricing``: the backend's USD per image, by size).

    Each test module wraps this in its own ``instrumented`` fixture.
    """
    monkeypatch.setattr(backends, "KINDS",
                        MappingProxyType({**backends.KINDS, KIND: IMPORT_PATH}))

    async def start(fail: bool = False, pricing: Mapping[str, float] | None = None,
                    **sections: Any) -> tuple[TestClient, InstrumentedBackend]:
        entry: dict[str, Any] = {"name": "inst", "kind": KIND, "fail": fail}
        if pricing is not None:
            entry["pricing"] = dict(pricing)
        client = await gateway_client(backends=[entry], route=["inst"], **sections)
        backend = client.app[ROUTER].backends["inst"]
        assert isinstance(backend, InstrumentedBackend)
        return client, backend
    return start


def variation_form(image: bytes, n: int = 1, size: str = "256x256", user: str | None = None,
                   response_format: str = "b64_json", model: str | None = None
                   ) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("image", image, filename="layer.png", content_type="image/png")
    if model is not None:
        form.add_field("model", model)
    form.add_field("n", str(n))
    form.add_field("size", size)
    form.add_field("response_format", response_format)
    if user is not None:
        form.add_field("user", user)
    return form


@dataclass
class Answer:
    status: int
    headers: Mapping[str, str]
    body: dict[str, Any]


async def vary(client: TestClient, image: bytes, *, token_user: str = "alice",
               headers: Mapping[str, str] | None = None, **form: Any) -> Answer:
    """POST one variations request; the whole answer, read."""
    async with client.post("/v1/images/variations", data=variation_form(image, **form),
                           headers={**auth(token_user), **(headers or {})}) as r:
        return Answer(r.status, r.headers.copy(), await r.json())


async def usage(client: TestClient, user: str = "alice") -> dict[str, Any]:
    async with client.get("/v1/usage", headers=auth(user)) as r:
        assert r.status == 200, await r.text()
        return await r.json()
