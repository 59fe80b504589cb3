"""The backend seam: what backends may import, and what a ``BackendError`` tells the router.

Backends sit below the router, the resilience policy and the config: an import from
``gateway/backends/`` to one of those (``parse_retry_after`` once lived in
``resilience.py``) would run back up a floor. The router reads a failure's retry and
breaker facts as plain attributes of :class:`BackendError`, so every error carries them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from gateway import backends as registry
from gateway.backends.base import BackendError, PublishedModel, Timeouts, bad_response
from gateway.backends.openai.edits import OpenAIEditsOptions
from gateway.backends.sdwebui import SdWebUIOptions

BACKENDS = Path(registry.__file__).parent
# What a backend may build on: its own package, the shared types, the error envelope,
# the PNG checks, and the package's version string.
ALLOWED = ("gateway.backends", "gateway.generation", "gateway.errors", "gateway.png")


def gateway_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "gateway":
                names.update(f"gateway.{alias.name}" for alias in node.names)
            else:
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n == "gateway" or n.startswith("gateway.")}


@pytest.mark.parametrize("path", sorted(BACKENDS.rglob("*.py")), ids=lambda p: p.name)
def test_backends_import_nothing_above_them(path: Path) -> None:
    above = {name for name in gateway_imports(path)
             if name != "gateway.__version__"
             and not any(name == a or name.startswith(a + ".") for a in ALLOWED)}
    assert above == set(), f"{path.relative_to(BACKENDS.parent)} imports {above}"


def test_a_backend_error_carries_the_routers_facts_with_defaults() -> None:
    plain = BackendError(502, "x")
    assert (plain.transient, plain.retry_after, plain.trips_breaker, plain.retryable) == (
        False, None, True, True)
    assert plain.should_retry is None and dict(plain.headers) == {}
    limited = BackendError(503, "x", transient=True, retry_after=2.2)
    assert dict(limited.headers) == {"retry-after": "3"}
    # A wait asked for with another status is a fact for the router, not a header.
    assert dict(BackendError(502, "x", retry_after=2.0).headers) == {}
    assert bad_response("b", "why").code == "upstream_bad_response"


def test_every_kind_is_built_from_name_options_and_timeouts(tmp_path: Path) -> None:
    workflow = tmp_path / "w.json"
    workflow.write_text('{"1": {"inputs": {"image": "{{image}}"}}}', encoding="utf-8")
    options = {
        "procedural": registry.options_class("procedural")(),
        "openai": registry.options_class("openai")(base_url="http://127.0.0.1:1/v1",
                                                   model="m"),
        "openai_edits": OpenAIEditsOptions(base_url="http://127.0.0.1:1/v1"),
        "sdwebui": SdWebUIOptions(base_url="http://127.0.0.1:1"),
        "comfyui": registry.options_class("comfyui")(base_url="http://127.0.0.1:1",
                                                     workflow=str(workflow)),
    }
    assert set(options) == set(registry.KINDS)
    for kind, opts in options.items():
        backend = registry.create_backend(f"b-{kind}", kind, opts, Timeouts(5.0, 1.0))
        assert (backend.name, backend.kind) == (f"b-{kind}", kind)
        # Only the OpenAI provider publishes its models' lifecycles.
        assert isinstance(backend, PublishedModel) == kind.startswith("openai")
