"""The one seam between the server and whatever generates tokens.

The server (`backend/api/`, `backend/serving/`) talks to an `Engine` and to
nothing else of the engine's: the built-in torch engine (`AsyncEngine`) and
the TensorRT-LLM engine (`backend/engine/trtllm/`) both satisfy it. An engine
takes token ids in and hands token ids out; the chat template,
detokenization, stop strings and usage numbers stay in `backend/serving/`, so
every engine answers in exactly the same shapes.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

from backend.engine.request import Request
from backend.scheduler.stats import SchedulerStats
from backend.scheduler.updates import RequestUpdate


class Engine(Protocol):
    """What the server needs from an engine.

    Life cycle: build (blocking, may take minutes), `start()` inside the
    running event loop, serve `generate()` calls, `await stop()` once.
    """

    @property
    def stats(self) -> SchedulerStats:
        """A load snapshot for `/stats` and `/metrics`; cheap, never blocks."""
        ...

    @property
    def healthy(self) -> bool:
        """False once the engine can no longer serve (its worker died, or it stopped)."""
        ...

    def start(self) -> None:
        """Begin serving; call from inside the running event loop."""
        ...

    async def stop(self) -> None:
        """Finish serving and release the engine's resources."""
        ...

    def generate(self, request: Request) -> AsyncGenerator[RequestUpdate, None]:
        """Submit `request` and yield its updates; the last one has `finished` set.

        Raises `backend.scheduler.errors.QueueFullError` when the engine's
        waiting queue is full and `ValueError` for a request it could never
        run, both before the first update. Closing the generator early (client
        gone, stop string found) aborts the request and frees its KV cache.
        """
        ...

    def abort(self, request_id: str) -> None:
        """Abort a request by id; unknown or finished ids are ignored."""
        ...
