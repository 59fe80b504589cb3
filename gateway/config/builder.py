"""Plain YAML values typed into the config's frozen dataclasses, with path-and-line
errors. Unknown keys are errors: a typo in a quota must not silently mean "unlimited"."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

from gateway.config.model import ConfigError


class _Builder:
    """Types a plain YAML value into (frozen) dataclasses, with path-and-line errors."""

    def __init__(self, lines: Mapping[str, int]) -> None:
        self.lines = lines

    def error(self, message: str, path: str) -> ConfigError:
        line = self.lines.get(path)
        probe = path
        while line is None and probe:
            probe = probe.rsplit(".", 1)[0] if "." in probe else ""
            line = self.lines.get(probe)
        return ConfigError(message, path, line)

    def dataclass(self, cls: type, raw: Any, path: str, skip: frozenset[str] = frozenset()
                  ) -> dict[str, Any]:
        """Field values for ``cls`` from ``raw`` (only keys present in ``raw``)."""
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise self.error(f"expected a mapping, got {type(raw).__name__}", path)
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)} - skip
        out: dict[str, Any] = {}
        for key, value in raw.items():
            sub = f"{path}.{key}" if path else str(key)
            if key not in names:
                known = ", ".join(sorted(names))
                raise self.error(f"unknown key (known keys: {known})", sub)
            out[key] = self.value(hints[key], value, sub)
        return out

    def make(self, cls: type, raw: Any, path: str) -> Any:
        try:
            return cls(**self.dataclass(cls, raw, path))
        except TypeError as exc:  # a required field missing
            raise self.error(str(exc).split(".__init__() ")[-1], path) from None
        except ConfigError:  # a nested key's error already names its line and path
            raise
        except ValueError as exc:  # a dataclass's own range checks (__post_init__)
            raise self.error(str(exc), path) from None

    def value(self, tp: Any, raw: Any, path: str) -> Any:
        """``raw`` typed as ``tp`` (the dataclass field's annotation)."""
        if tp is Any:  # free-form (a backend's extra pipeline arguments)
            return raw
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):
            if raw is None and type(None) in args:
                return None
            inner = [a for a in args if a is not type(None)]
            return self.value(inner[0], raw, path)
        if origin is Literal:
            if raw not in args:
                allowed = ", ".join(repr(a) for a in args)
                raise self.error(f"must be one of {allowed}, got {raw!r}", path)
            return raw
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self.make(tp, raw, path)
        if origin is tuple:
            if not isinstance(raw, list):
                raise self.error(f"expected a list, got {type(raw).__name__}", path)
            return tuple(self.value(args[0], v, f"{path}[{i}]") for i, v in enumerate(raw))
        if origin in (Mapping, dict):
            if not isinstance(raw, Mapping):
                raise self.error(f"expected a mapping, got {type(raw).__name__}", path)
            return {str(k): self.value(args[1], v, f"{path}.{k}") for k, v in raw.items()}
        scalar = self._SCALARS.get(tp)
        if scalar is None:
            raise self.error(f"unsupported type {tp!r}", path)  # pragma: no cover
        return scalar(self, raw, path)

    def _bool(self, raw: Any, path: str) -> bool:
        if not isinstance(raw, bool):
            raise self.error(f"expected true or false, got {raw!r}", path)
        return raw

    def _int(self, raw: Any, path: str) -> int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise self.error(f"expected an integer, got {raw!r}", path)
        if raw < 0:
            raise self.error(f"must not be negative, got {raw}", path)
        return raw

    def _float(self, raw: Any, path: str) -> float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise self.error(f"expected a number, got {raw!r}", path)
        if not math.isfinite(raw):  # YAML's .nan / .inf: every comparison with NaN is False
            raise self.error(f"expected a finite number, got {raw!r}", path)
        if raw < 0:
            raise self.error(f"must not be negative, got {raw}", path)
        return float(raw)

    def _str(self, raw: Any, path: str) -> str:
        if isinstance(raw, bool) or raw is None or isinstance(raw, list | dict):
            raise self.error(f"expected a string, got {raw!r}", path)
        return str(raw)

    _SCALARS: typing.ClassVar[dict[Any, Callable[[_Builder, Any, str], Any]]] = {
        bool: _bool, int: _int, float: _float, str: _str}
