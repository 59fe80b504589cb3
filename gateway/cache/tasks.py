"""Tasks the cache lets outlive the request that started them (its client may leave)."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import structlog

log = structlog.get_logger("gateway.cache")
T = TypeVar("T")


async def outlive_cancel(task: asyncio.Future[T]) -> T:
    """Await ``task``; if the caller is cancelled meanwhile, ``task`` still completes
    (its failure then logged here, since nobody else awaits it)."""
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_log_failure)
        raise


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        log.warning("cache_landing_failed", error=type(exc).__name__, detail=str(exc))
