"""The bridge between the asyncio server and the synchronous engine core.

The core runs on one dedicated thread (a `ComputeThread`, the same one that
loaded the model), step after step, and is touched by no other thread: the
event loop sends it commands through a thread-safe queue and receives each
step's updates in one `call_soon_threadsafe` per step. This
keeps the event loop free while the model computes.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass

import structlog

from backend.engine.compute_thread import ComputeThread
from backend.engine.core import EngineCore
from backend.engine.request import Request
from backend.scheduler.stats import SchedulerStats
from backend.scheduler.updates import RequestUpdate

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class _Add:
    request: Request
    stream: asyncio.Queue[RequestUpdate | BaseException]
    admitted: asyncio.Future[None]


@dataclass(frozen=True)
class _Abort:
    request_id: str


_Command = _Add | _Abort | None
_IDLE_WAIT_S = 0.005


class AsyncEngine:
    """Runs an `EngineCore` in a thread and streams per-request updates.

    The built-in torch engine; satisfies `backend.engine.protocol.Engine`.
    `thread` is the compute thread the model was loaded on (a new one when
    None); the engine loop runs there.
    """

    def __init__(
        self,
        core: EngineCore,
        *,
        thread: ComputeThread | None = None,
        on_step: Callable[[float, int], None] | None = None,
    ):
        self._core = core
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[RequestUpdate | BaseException]] = {}
        self._compute = thread or ComputeThread()
        self._running: Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stats: SchedulerStats = core.scheduler.stats()
        self._on_step = on_step
        self._failure: BaseException | None = None

    @property
    def stats(self) -> SchedulerStats:
        """The scheduler's numbers as of the end of the last step."""
        return self._stats

    @property
    def healthy(self) -> bool:
        """False once the engine thread has died."""
        return self._failure is None and self._running is not None and not self._running.done()

    def start(self) -> None:
        """Start the engine loop on its thread; call from inside the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._running = self._compute.submit(self._run)

    async def stop(self) -> None:
        """Ask the engine loop to finish, wait for it (up to 10 s), free the thread."""
        self._commands.put(None)
        if self._running is not None:
            await asyncio.to_thread(wait, [self._running], 10.0)
        self._compute.shutdown()

    def abort(self, request_id: str) -> None:
        """Abort a request by id on the next step; unknown ids are ignored."""
        self._commands.put(_Abort(request_id))

    async def generate(self, request: Request) -> AsyncGenerator[RequestUpdate, None]:
        """Submit `request` and yield its updates until it finishes.

        Raises the scheduler's QueueFullError when the waiting queue is full.
        Leaving the iteration early (client gone, stop string found) aborts the
        request, which frees its KV blocks on the next step.
        """
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue[RequestUpdate | BaseException] = asyncio.Queue()
        admitted: asyncio.Future[None] = loop.create_future()
        self._streams[request.request_id] = stream
        finished = False
        try:
            self._commands.put(_Add(request, stream, admitted))
            await admitted
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request.request_id, None)
            if not finished:
                self._commands.put(_Abort(request.request_id))

    # --- engine thread -------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                block = not self._core.has_unfinished()
                if not self._drain(block=block):
                    return
                if not self._core.has_unfinished():
                    continue
                updates = self._core.step()
                self._stats = self._core.scheduler.stats()
                if updates:
                    self._deliver(updates)
                elif not self._drain_for(_IDLE_WAIT_S):
                    # Nothing could run (every waiting request needs blocks
                    # that are not free yet): wait for a command, not spin.
                    return
        except BaseException as exc:  # the thread must report, not vanish
            log.exception("engine_thread_failed")
            self._failure = exc
            self._fail_all(exc)

    def _drain_for(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for one command, then apply the rest."""
        try:
            cmd = self._commands.get(timeout=timeout_s)
        except queue.Empty:
            return True
        self._commands.put(cmd)
        return self._drain(block=False)

    def _drain(self, *, block: bool) -> bool:
        """Apply queued commands; False means stop."""
        while True:
            try:
                cmd = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if cmd is None:
                return False
            if isinstance(cmd, _Abort):
                self._core.abort_request(cmd.request_id)
                continue
            try:
                self._core.add_request(cmd.request)
            except Exception as exc:
                self._resolve(cmd.admitted, exc)
            else:
                self._resolve(cmd.admitted, None)

    def _resolve(self, fut: asyncio.Future[None], exc: BaseException | None) -> None:
        assert self._loop is not None

        def settle() -> None:
            if fut.done():
                return
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)

        self._loop.call_soon_threadsafe(settle)

    def _deliver(self, updates: list[RequestUpdate]) -> None:
        assert self._loop is not None

        def dispatch() -> None:
            for update in updates:
                stream = self._streams.get(update.request_id)
                if stream is not None:
                    stream.put_nowait(update)

        self._loop.call_soon_threadsafe(dispatch)

    def _fail_all(self, exc: BaseException) -> None:
        if self._loop is None:
            return

        def dispatch() -> None:
            for stream in self._streams.values():
                stream.put_nowait(exc)

        self._loop.call_soon_threadsafe(dispatch)
