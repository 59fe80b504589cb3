"""The embedded, offline ``procedural`` backend: a Pillow recipe (:mod:`.recipe`), not a
neural model, run on a pool of workers.

The work runs in a process pool by default. Many of Pillow's filters and transforms
hold the GIL: a thread pool was as fast for one request on an idle box, but with four
concurrent n=10 requests at 1024 px it took 5.7 s against 3.1 s for processes, and
stalled the event loop for up to 21 ms against 9 ms (``tests/perf/bench_procedural.py``
measures the single-request case). The price is shipping the source PNG to a worker
once per chunk and the PNG results back, a few ms per MB.
"""


from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from typing import ClassVar, Literal

from PIL import Image

from gateway.backends.base import (
    DEFAULT_TIMEOUTS,
    BackendError,
    BackendOptions,
    BackendState,
    Controls,
    Timeouts,
)
from gateway.backends.procedural.recipe import ALGORITHM_VERSION, render_seed
from gateway.generation import Generation, VariationRequest


@dataclass(frozen=True)
class ProceduralOptions(BackendOptions):
    """Options of a ``kind: procedural`` backend.

    ``strength`` (0..1) is how far variations stray from the source: rotation, warp,
    hue range and the odds of a painterly filter all scale with it. ``workers`` is the
    executor size (default ``min(2, cpu count)``); ``executor`` picks processes (the
    default, see the module docstring) or threads (where extra processes are unwanted).
    """

    strength: float = 0.5
    workers: int | None = None
    executor: Literal["process", "thread"] = "process"

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be between 0 and 1, got {self.strength}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.executor not in ("process", "thread"):
            raise ValueError(f"executor must be 'process' or 'thread', got {self.executor!r}")


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _watch_parent(parent_pid: int, interval: float = 1.0) -> None:
    """Where there is no parent-death signal: exit once the gateway is gone."""
    while os.getppid() == parent_pid:
        time.sleep(interval)
    os._exit(0)


def _worker_init(parent_pid: int) -> None:
    """Runs first in every worker: its life ends with the gateway's.

    A kill -9 of the gateway, or a SIGTERM during start-up before its handlers were in
    place, used to leave the workers (and, through them, multiprocessing's resource
    tracker) running for good: they wait on a queue whose write end they hold
    themselves. On Linux the kernel sends SIGTERM when the parent dies (prctl
    ``PR_SET_PDEATHSIG``; workers are spawned from the event loop's thread, which lives
    as long as the process); elsewhere a thread watches the parent. Ctrl-C reaches the
    whole process group: workers ignore SIGINT and let the gateway shut them down, so
    no worker prints a KeyboardInterrupt traceback.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    armed = False
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
    if os.getppid() != parent_pid:  # the gateway died before the signal was armed
        os._exit(0)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True,
                         name="parent-watch").start()


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while workers are spawned (main thread only; elsewhere a no-op).

    A spawned process inherits an *ignored* SIGINT through exec, and Python then keeps
    it ignored: a Ctrl-C in the terminal, which reaches the whole process group, cannot
    interrupt a worker still importing, before ``_worker_init`` runs. The gateway's own
    handler is back as soon as the workers are spawned.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _warm_up() -> int:
    """Runs once per worker at start so the first request does not pay for imports."""
    return os.getpid()


# --------------------------------------------------------------------------- backend


class ProceduralBackend:
    """In-process Pillow generator: the default backend, for demos and load tests."""

    kind: ClassVar[str] = "procedural"
    options_class: ClassVar[type[BackendOptions]] = ProceduralOptions

    def __init__(self, name: str, options: ProceduralOptions,
                 timeouts: Timeouts = DEFAULT_TIMEOUTS) -> None:
        # ``timeouts`` bound network exchanges; nothing here waits on one (the router's
        # deadline still bounds each call).
        self.name = name
        self.options = options
        self.workers = options.workers or min(2, os.cpu_count() or 1)
        self._executor: Executor | None = None
        # Images handed to the executor and not finished yet, and images rendered: a
        # request that is cancelled stops submitting, and the image in progress is the
        # last its worker makes. Updated from executor threads, hence the lock.
        self._counts_lock = threading.Lock()
        self._submitted = 0
        self._finished = 0
        self._rendered = 0

    @property
    def identity(self) -> str:
        # Workers and executor kind do not change the pixels, so they are not part of it.
        return f"procedural:v{ALGORITHM_VERSION}:strength={self.options.strength:g}"

    @property
    def controls(self) -> Controls:
        """Strength and seed drive the recipe; it reads no text, so no hint."""
        return Controls(strength=self.options.strength, seed=True)

    def _new_executor(self) -> Executor:
        if self.options.executor == "thread":
            return ThreadPoolExecutor(self.workers, thread_name_prefix=f"procedural-{self.name}")
        # "spawn": forking an asyncio process that already runs threads can deadlock.
        return ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"),
                                   initializer=_worker_init, initargs=(os.getpid(),))

    async def start(self) -> None:
        """Create the executor and start its workers; calling it again is a no-op."""
        if self._executor is not None:
            return
        executor = self._executor = self._new_executor()
        loop = asyncio.get_running_loop()
        with _sigint_ignored():  # submitting spawns the workers, one per call
            warm_ups = [loop.run_in_executor(executor, _warm_up) for _ in range(self.workers)]
        try:
            await asyncio.gather(*warm_ups)
        except BaseException:
            # Leave no half-started pool behind, so a later start() can try again.
            if self._executor is executor:
                self._executor = None
            executor.shutdown(wait=False, cancel_futures=True)
            raise

    async def close(self) -> None:
        """Shut the executor down; ``start`` may be called again afterwards."""
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: executor.shutdown(wait=True, cancel_futures=True)
            )

    async def check(self) -> BackendState:
        started = self._executor is not None
        return BackendState(
            name=self.name,
            kind=self.kind,
            ready=started,
            detail="procedural generator (Pillow), not a neural model"
            if started else "not started",
            extra={
                "strength": self.options.strength,
                "executor": self.options.executor,
                "workers": self.workers,
                "images_in_progress": self.images_in_progress(),
            },
        )

    def images_in_progress(self) -> int:
        """Images submitted to the workers and not finished (queued or rendering)."""
        with self._counts_lock:
            return self._submitted - self._finished

    @property
    def images_rendered(self) -> int:
        """Images the workers have finished since start, for requests that left too."""
        with self._counts_lock:
            return self._rendered

    def _image_done(self, future: Future[bytes]) -> None:
        with self._counts_lock:
            self._finished += 1
            if not future.cancelled() and future.exception() is None:
                self._rendered += 1

    async def _render(self, executor: Executor, request: VariationRequest, seed: int
                      ) -> bytes:
        """One image on a worker. Cancelled while queued, it never runs; cancelled while
        it renders, the worker finishes it (a process cannot be interrupted safely) and
        the caller submits no more."""
        with self._counts_lock:
            self._submitted += 1
        try:
            strength = self.options.strength if request.strength is None \
                else request.strength
            future = executor.submit(render_seed, request.image.png, request.size, seed,
                                     strength)
        except BaseException as exc:
            with self._counts_lock:
                self._finished += 1
            if isinstance(exc, RuntimeError) and not isinstance(exc, BrokenProcessPool):
                # shut down by close() between two images
                raise BackendError(503, f"backend {self.name!r} was closed", kind="closed",
                                   retryable=True, trips_breaker=False) from None
            raise
        future.add_done_callback(self._image_done)
        return await asyncio.wrap_future(future)

    async def generate(self, request: VariationRequest) -> Generation:
        """Render the ``n`` images on the workers, one task per image and at most one
        image per worker at a time, so a request whose client leaves (cancelled) stops
        its workers after the images in progress instead of rendering all ``n``."""
        executor = self._executor
        if executor is None:
            raise BackendError(503, f"backend {self.name!r} is not started",
                               kind="not_started", retryable=True, trips_breaker=False)
        if request.n <= 0:
            return Generation([])
        images: list[bytes] = [b""] * request.n
        lanes = min(self.workers, request.n)

        async def lane(first: int) -> None:
            for i in range(first, request.n, lanes):
                images[i] = await self._render(executor, request, request.seed + i)

        tasks = [asyncio.ensure_future(lane(k)) for k in range(lanes)]
        try:
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._executor is executor or (task is not None and task.cancelling()):
                raise  # our caller was cancelled: let it propagate
            # close() cancelled the queued chunks: a failure of this backend, not the caller's.
            raise BackendError(503, f"backend {self.name!r} was closed", kind="closed",
                               retryable=True, trips_breaker=False) from None
        except BrokenProcessPool as exc:
            # A worker died (e.g. killed for memory): replace the pool for later requests.
            if self._executor is executor:
                self._executor = self._new_executor()
                executor.shutdown(wait=False, cancel_futures=True)
            raise BackendError(503, "procedural worker crashed", kind="worker_crash",
                               retryable=True, trips_breaker=False) from exc
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise BackendError(500, f"procedural generator failed: {exc}", kind="error",
                               retryable=False, trips_breaker=False) from exc
        finally:  # one lane failed (or we were cancelled): the others submit no more
            for pending in tasks:
                pending.cancel()
        return Generation(images)
