"""Structured logging: one JSON line per event, or readable console output on a TTY.

Only what the gateway chooses to log is logged: request lines carry the user name, the
raw ``user`` form field, status, latency, backend and bytes; never tokens or keys.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog
from aiohttp.http_exceptions import HttpProcessingError

# What a terminal acts on rather than shows: C0 and C1 controls and DEL (escape
# sequences retitle or clear the operator's terminal), line and paragraph separators,
# and the bidirectional overrides that make text read differently from what it is.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e"
                      "\u2066-\u2069]")
_CONTROL_KEEP_NEWLINES = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u200e"
                                    "\u200f\u202a-\u202e\u2066-\u2069]")


def _escaped(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def printable(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every control character written as an escape (``\\x1b``, ``\\n``,
    ``\\u202e``), so a client's path, ``user`` or ``model`` can be logged or stored and
    later shown on a terminal without acting on it. Plain text is returned as is, fast.
    """
    if text.isprintable() and text.isascii():
        return text
    return (_CONTROL_KEEP_NEWLINES if keep_newlines else _CONTROL).sub(_escaped, text)


def escape_controls(_logger: Any, _name: str, event: MutableMapping[str, Any]
                    ) -> MutableMapping[str, Any]:
    """structlog processor for the console renderer, which writes strings as they are
    (JSON escapes them itself). Tracebacks keep their line breaks."""
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = printable(value, keep_newlines=key in ("exception", "stack"))
    return event


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog and the stdlib root logger (aiohttp logs through it)."""
    stream = stream or sys.stdout
    console = fmt == "console" or (fmt == "auto" and stream.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=True) if console
        else structlog.processors.JSONRenderer()
    )
    numeric = getattr(logging, level.upper())
    escaping: list[structlog.typing.Processor] = [escape_controls] if console else []
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            *escaping,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s", force=True)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_PrintableFormatter("%(levelname)s %(name)s: %(message)s"))
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _MalformedRequestFilter) for f in server.filters):
        server.addFilter(_MalformedRequestFilter())


class _PrintableFormatter(logging.Formatter):
    """The stdlib's lines (aiohttp's own) with control characters escaped: a message
    may quote what a client sent."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return printable(super().formatException(ei), keep_newlines=True)

    def formatStack(self, stack_info: str) -> str:
        return printable(super().formatStack(stack_info), keep_newlines=True)


class _MalformedRequestFilter(logging.Filter):
    """aiohttp logs each request it cannot parse at ERROR with a traceback: any client
    could fill the log with them. Keep one warning line, without the client's bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = "rejected a malformed HTTP request (%s, %s)"
            record.args = (type(exc).__name__, exc.code)
        return True
