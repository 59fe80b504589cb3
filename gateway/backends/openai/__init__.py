"""The OpenAI images API as one provider with two endpoints.

``kind: openai`` speaks ``POST /images/variations`` (:mod:`.variations`), ``kind:
openai_edits`` speaks ``POST /images/edits`` (:mod:`.edits`). What they share lives
here: the account options (``base_url`` ending in ``/v1``, key, organization, project,
model), the headers the official SDK sends, the lifecycle record OpenAI publishes for a
model, and reading the ``data`` array of an images response.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

from gateway.backends.base import bad_response
from gateway.backends.http import HttpBackend, HttpOptions, decode_b64, gather_all


@dataclass(frozen=True)
class OpenAIAccount(HttpOptions):
    """What both endpoints are configured with: where, as whom, and which model."""

    api_key: str = field(default="", repr=False)
    organization: str | None = None
    project: str | None = None
    model: str = ""

    def auth_headers(self) -> dict[str, str]:
        """The auth headers the OpenAI SDK sends (no ``Authorization`` for an empty key)."""
        headers: dict[str, str] = {}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if self.organization:
            headers["OpenAI-Organization"] = self.organization
        if self.project:
            headers["OpenAI-Project"] = self.project
        return headers


AccountT = TypeVar("AccountT", bound=OpenAIAccount)


class OpenAIEndpoint(HttpBackend[AccountT]):
    """Base of the two OpenAI endpoints: credentials on every request, the model the
    lifecycle watcher follows, and the images of an answer."""

    @property
    def model(self) -> str:
        return self.options.model

    @property
    def lifecycle_model(self) -> str | None:
        return self.options.model  # OpenAI publishes its shutdown_date (gateway.lifecycle)

    def headers(self) -> dict[str, str]:
        return {**super().headers(), **self.options.auth_headers()}

    async def model_record(self, model: str) -> tuple[int, bytes]:
        """``GET {base}/models/{model}``: ``(status, body)`` of any answer (a 4xx
        ``model_not_found`` is news, not a failure); see :meth:`HttpBackend.answer`."""
        return await self.answer("GET", f"/models/{quote(model, safe='')}")

    async def images(self, payload: Any, n: int) -> list[bytes]:
        """Image bytes of the first ``n`` items of ``payload``'s ``data``:
        ``b64_json`` decoded, ``url`` downloaded."""
        async def one(item: dict[str, Any]) -> bytes:
            if item.get("b64_json"):
                return decode_b64(self.name, item["b64_json"])
            if isinstance(item.get("url"), str):
                return await self.download(item["url"])
            raise bad_response(self.name, "item has neither b64_json nor url")
        return await gather_all(*(one(i) for i in data_items(self.name, payload, n)))


def data_items(name: str, payload: Any, n: int) -> list[dict[str, Any]]:
    """The first ``n`` items of an OpenAI images response's ``data``."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise bad_response(name, "no data array")
    if len(data) < n:
        raise bad_response(name, f"{len(data)} images instead of {n}")
    return data[:n]
