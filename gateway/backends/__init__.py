"""Backend registry: ``kind`` -> the class that implements it.

Adding a backend means adding its file here and to docs/backends.md; nothing else changes.
Classes are imported lazily so an edge box running only ``procedural`` never imports
the HTTP clients of the others. The two OpenAI kinds are the two endpoints of one
provider package, ``gateway.backends.openai``.
"""

from __future__ import annotations

import importlib
from types import MappingProxyType

from gateway.backends.base import (
    DEFAULT_TIMEOUTS,
    Backend,
    BackendClass,
    BackendOptions,
    Timeouts,
)

__all__ = ["KINDS", "Backend", "BackendOptions", "Timeouts", "backend_class",
           "create_backend", "options_class"]

KINDS: MappingProxyType[str, str] = MappingProxyType(
    {
        "procedural": "gateway.backends.procedural:ProceduralBackend",
        "openai": "gateway.backends.openai.variations:OpenAIBackend",
        "openai_edits": "gateway.backends.openai.edits:OpenAIEditsBackend",
        "sdwebui": "gateway.backends.sdwebui:SdWebUIBackend",
        "comfyui": "gateway.backends.comfyui:ComfyUIBackend",
    }
)


def backend_class(kind: str) -> BackendClass:
    """The class registered for ``kind``; ``KeyError`` if unknown."""
    module_name, _, attr = KINDS[kind].partition(":")
    cls: BackendClass = getattr(importlib.import_module(module_name), attr)
    return cls


def options_class(kind: str) -> type[BackendOptions]:
    return backend_class(kind).options_class


def create_backend(name: str, kind: str, options: BackendOptions,
                   timeouts: Timeouts = DEFAULT_TIMEOUTS) -> Backend:
    """A backend of ``kind`` named ``name``, bounded by ``timeouts``."""
    return backend_class(kind)(name, options, timeouts)
