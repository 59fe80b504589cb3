"""Giving memory back to the system after a burst of large uploads.

glibc keeps freed heap memory for reuse: after 600 held-open 4 MB uploads (most of them
refused, but their first few hundred KB were buffered) the gateway's RSS stayed at twice
its idle size, and after a burst of admitted uploads at six times. ``malloc_trim(0)``
returns the free pages inside the heap too. It is cheap on a quiet heap but walks every
arena under its lock, so :func:`trim_after_bursts` calls it only when RSS has grown
well past the lowest level seen after a trim (the process's idle size with its caches).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable

import structlog

log = structlog.get_logger("gateway.memory")

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """This process's resident set size (0 where ``/proc`` is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, or ``None`` off glibc (musl, macOS)."""
    if not sys.platform.startswith("linux"):
        return None
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
        trim.argtypes = [ctypes.c_size_t]
        return lambda: trim(0)
    return None


async def trim_after_bursts(interval: float = 5.0, slack: int = 16 * 1024**2) -> None:
    """Every ``interval`` seconds: if RSS is more than ``slack`` above the lowest RSS
    seen after a trim, trim (in a thread: it can take milliseconds on a large heap)."""
    trim = malloc_trim()
    if trim is None or not rss_bytes():
        return
    loop = asyncio.get_running_loop()
    floor = rss_bytes()
    while True:
        await asyncio.sleep(interval)
        before = rss_bytes()
        if before <= floor + slack:
            continue
        await loop.run_in_executor(None, trim)
        after = rss_bytes()
        floor = min(floor, after) if floor else after
        if before - after > slack:
            log.info("memory_returned", rss_before_mb=round(before / 2**20, 1),
                     rss_after_mb=round(after / 2**20, 1))
