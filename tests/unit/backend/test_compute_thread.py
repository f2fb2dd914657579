"""The compute thread: the torch engine loads and steps on one thread.

libgomp slows every operator when torch compute is spread over several
threads (backend/engine/compute_thread.py), so the engine loop must run on the
very thread that built the model.
"""

from __future__ import annotations

import threading

import pytest

from backend.config import SchedulerConfig
from backend.engine.async_engine import AsyncEngine
from backend.engine.compute_thread import ComputeThread
from backend.engine.core import EngineCore
from backend.engine.request import Request, SamplingParams
from backend.kv_cache.manager import KVCacheManager
from backend.scheduler.output import ModelOutput, SchedulerOutput
from backend.scheduler.scheduler import Scheduler


class ThreadRecordingExecutor:
    """Samples token 7 every step and records the thread each step ran on."""

    def __init__(self) -> None:
        self.threads: set[int] = set()

    def execute(self, scheduler_output: SchedulerOutput) -> ModelOutput:
        self.threads.add(threading.get_ident())
        return ModelOutput(sampled={c.request_id: 7 for c in scheduler_output.chunks if c.sample})

    def release(self, request_id: str) -> None:
        pass


async def test_runs_calls_in_order_on_one_named_thread() -> None:
    compute = ComputeThread("test-compute")

    def where(i: int) -> tuple[int, str]:
        return i, threading.current_thread().name

    try:
        seen = [await compute.run(where, i) for i in range(3)]
    finally:
        compute.shutdown()
    assert seen == [(0, "test-compute"), (1, "test-compute"), (2, "test-compute")]


async def test_an_exception_reaches_the_caller_and_the_thread_keeps_serving() -> None:
    compute = ComputeThread()

    def boom() -> None:
        raise ValueError("no model")

    try:
        with pytest.raises(ValueError, match="no model"):
            await compute.run(boom)
        assert await compute.run(lambda: 42) == 42
    finally:
        compute.shutdown()


async def test_the_engine_steps_on_the_thread_that_built_it() -> None:
    compute = ComputeThread()
    loader_thread = await compute.run(threading.get_ident)
    executor = ThreadRecordingExecutor()
    scheduler = Scheduler(SchedulerConfig(), KVCacheManager(64, 16, enable_prefix_caching=False))
    engine = AsyncEngine(EngineCore(scheduler, executor), thread=compute)
    engine.start()
    try:
        request = Request("r", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0))
        tokens = [t async for update in engine.generate(request) for t in update.new_token_ids]
    finally:
        await engine.stop()
    assert tokens == [7, 7, 7, 7]
    assert executor.threads == {loader_thread}
    assert loader_thread != threading.get_ident()
