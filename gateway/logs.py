"""Structured logging: one JSON line per event, or readable console output on a TTY.

Only what the gateway chooses to log is logged: request lines carry the user name, the
raw ``user`` form field, status, latency, backend and bytes; never tokens or keys.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog
from aiohttp.http_exceptions import HttpProcessingError


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog and the stdlib root logger (aiohttp logs through it)."""
    stream = stream or sys.stdout
    console = fmt == "console" or (fmt == "auto" and stream.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=True) if console
        else structlog.processors.JSONRenderer()
    )
    numeric = getattr(logging, level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s", force=True)
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _MalformedRequestFilter) for f in server.filters):
        server.addFilter(_MalformedRequestFilter())


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
