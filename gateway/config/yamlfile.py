"""YAML in: composed into nodes first, so every error can name the key's path *and* its
line; ``${ENV}``, ``${ENV:-default}`` and ``${ENV:?what to do}`` are substituted in
scalars before typing, so ``port: ${PORT:-8080}`` is still an int. Any other ``${``
(``${KEY-}``, ``${KEY:=x}``) is refused: kept as text it became, say, a signing key
anyone can read in the docs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

from gateway.config.model import ConfigError

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::([-?])(.*?))?\}")
_LEFTOVER_RE = re.compile(r"\$\{[^}\s]{0,40}\}?")  # shown: the form, never a value
_FORMS = "${NAME}, ${NAME:-default} or ${NAME:?what to do}"


def _interpolate(value: str, env: Mapping[str, str], path: str, line: int | None) -> str:
    """``${NAME:?advice}`` (as in the shell and compose): unset or empty is an error that
    says ``advice``, the fix a shipped config (the container's) can spell out."""
    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env and (env[name] != "" or op is None):
            return env[name]
        if op == "-":
            return arg
        if op == "?":
            raise ConfigError(f"{name} is not set: {arg or 'set it'}", path, line)
        raise ConfigError(f"environment variable {name} is not set", path, line)

    left = _LEFTOVER_RE.search(_ENV_RE.sub("", value))
    if left is not None:  # ${KEY-}, ${KEY?x}, ${KEY:=x}: kept as text, a public "secret"
        raise ConfigError(f"{left.group(0)} is not a substitution this loader knows (it "
                          f"would stay as literal text): use {_FORMS}", path, line)
    return _ENV_RE.sub(sub, value)


def env_names(text: str) -> list[str]:
    """The environment variables ``text``'s values substitute (comments aside), in order,
    once each; none for a file that is not YAML (its load reports that)."""
    names: list[str] = []

    def walk(node: yaml.Node) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                walk(key)
                walk(value)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item)
        elif isinstance(node, yaml.ScalarNode):
            names.extend(m.group(1) for m in _ENV_RE.finditer(str(node.value)))

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return []
    if node is not None:
        walk(node)
    return list(dict.fromkeys(names))


class _Loader(yaml.SafeLoader):
    """SafeLoader; interpolation happens on nodes before construction."""


def _walk_nodes(
    node: yaml.Node, path: str, lines: dict[str, int], env: Mapping[str, str], loader: _Loader
) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = str(key_node.value)
            sub = f"{path}.{key}" if path else key
            _walk_nodes(value_node, sub, lines, env, loader)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk_nodes(item, f"{path}[{i}]", lines, env, loader)
    elif isinstance(node, yaml.ScalarNode) and "${" in str(node.value):
        node.value = _interpolate(node.value, env, path, lines[path])
        if node.style is None:  # plain scalar: re-resolve so "8080" becomes an int
            # (types-PyYAML leaves Resolver.resolve untyped)
            node.tag = loader.resolve(  # type: ignore[no-untyped-call]
                yaml.ScalarNode, node.value, (True, False))


def _load_yaml(text: str, env: Mapping[str, str]) -> tuple[Any, dict[str, int]]:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}, {}
        lines: dict[str, int] = {}
        _walk_nodes(node, "", lines, env, loader)
        return loader.construct_document(node), lines
    except yaml.MarkedYAMLError as exc:
        raise _yaml_error(exc) from None
    finally:
        loader.dispose()


def _yaml_error(exc: yaml.MarkedYAMLError) -> ConfigError:
    """The line an admin has to edit, for a YAML syntax error.

    PyYAML's ``problem_mark`` is where it gave up, which for an unfinished token (a key
    without its ``:``, an unclosed quote or bracket) is the start of the *next* line or
    the end of the file: one line late. Its ``context_mark`` is where that token began:
    the line to fix. Block-structure errors keep the problem mark: their context is the
    whole enclosing block, often line 1.
    """
    problem, context = exc.problem_mark, exc.context_mark
    line = problem.line + 1 if problem is not None else None
    message = f"invalid YAML: {exc.problem}"
    unfinished = isinstance(exc, yaml.scanner.ScannerError) or "flow" in str(exc.context)
    if context is not None and unfinished and (line is None or context.line + 1 < line):
        message += f" ({exc.context} that starts on this line; noticed on line {line})"
        line = context.line + 1
    return ConfigError(message, "", line)
