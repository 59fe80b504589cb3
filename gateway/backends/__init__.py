"""Backend registry: ``kind`` -> the class that implements it.

Adding a backend means adding its file here and to docs/backends.md; nothing else changes.
Classes are imported lazily so an edge box running only ``procedural`` never imports
the HTTP clients of the others.
"""

from __future__ import annotations

import importlib
from types import MappingProxyType

from gateway.backends.base import Backend, BackendOptions

KINDS: MappingProxyType[str, str] = MappingProxyType(
    {
        "procedural": "gateway.backends.procedural:ProceduralBackend",
        "openai": "gateway.backends.openai:OpenAIBackend",
        "openai_edits": "gateway.backends.openai_edits:OpenAIEditsBackend",
        "sdwebui": "gateway.backends.sdwebui:SdWebUIBackend",
        "comfyui": "gateway.backends.comfyui:ComfyUIBackend",
    }
)


def backend_class(kind: str) -> type[Backend]:
    """The class registered for ``kind``; ``KeyError`` if unknown."""
    module_name, _, attr = KINDS[kind].partition(":")
    return getattr(importlib.import_module(module_name), attr)


def options_class(kind: str) -> type[BackendOptions]:
    return backend_class(kind).options_class


def create_backend(name: str, kind: str, options: BackendOptions) -> Backend:
    return backend_class(kind)(name, options)  # type: ignore[call-arg]
