"""The one thread that runs the backend's torch compute.

Loading the model, warming it up and every engine step run on this thread, and
on no other. The reason is OpenMP, not Python: libgomp gives every thread that
opens a parallel region its own team of worker threads, and once it manages
more threads than there are CPUs it stops spin-waiting between regions and
puts its workers to sleep after each one. A model loaded on one thread and
stepped on another therefore paid a futex wake-up per operator: on a 2-core
machine a batch-1 decode step of the bundled model took 55 ms instead of 21 ms
(docs/backend.md, "One compute thread").
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class ComputeThread:
    """A single named worker thread that runs submitted calls in order.

    A daemon thread, unlike a `ThreadPoolExecutor`'s: the engine loop on it
    blocks waiting for work, and must not keep the interpreter from exiting.
    """

    def __init__(self, name: str = "engine-core") -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    def submit(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Queue `fn(*args, **kwargs)` on the thread; returns its future."""
        future: Future[T] = Future()

        def job() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # delivered to whoever awaits the future
                future.set_exception(exc)
            else:
                future.set_result(result)

        self._jobs.put(job)
        return future

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn(*args, **kwargs)` on the thread and await its result."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def shutdown(self) -> None:
        """Let the thread exit once its queued calls are done; does not wait."""
        self._jobs.put(None)
