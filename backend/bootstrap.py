"""Loads the model and wires engine, metrics and service into the server state."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable
from dataclasses import replace

import structlog

from backend.api.server import BackendState
from backend.config import EngineConfig
from backend.engine.async_engine import AsyncEngine
from backend.engine.compute_thread import ComputeThread
from backend.engine.core import EngineCore
from backend.executor.model_runner import ModelRunner
from backend.kv_cache.manager import KVCacheManager
from backend.scheduler.scheduler import Scheduler
from backend.serving.generation import GenerationService
from backend.serving.metrics import EngineMetrics

log = structlog.get_logger(__name__)


def build_service(
    config: EngineConfig, thread: ComputeThread | None = None
) -> tuple[GenerationService, ModelRunner]:
    """Load weights and build every engine part; blocking, call off the event loop.

    Call it on `thread`, the compute thread the engine will then step on (see
    `backend.engine.compute_thread` for why loading and stepping share it).
    """
    runner = ModelRunner(config.model, config.cache, config.scheduler)
    kv = KVCacheManager(
        runner.num_blocks,
        runner.block_size,
        enable_prefix_caching=config.cache.enable_prefix_caching,
    )
    # A request must fit the whole KV pool, or it would wait forever.
    max_model_len = min(runner.max_model_len, runner.num_blocks * runner.block_size)
    scheduler_config = replace(config.scheduler, max_model_len=max_model_len)
    scheduler = Scheduler(scheduler_config, kv)
    core = EngineCore(scheduler, runner)
    engine = AsyncEngine(core, thread=thread)
    metrics = EngineMetrics(config.model.served_names[0], lambda: engine.stats)
    service = GenerationService(
        engine, runner.tokenizer, max_model_len=max_model_len, metrics=metrics
    )
    runner.warmup()
    return service, runner


async def serve_when_loaded(
    state: BackendState, load: Awaitable[tuple[GenerationService, dict[str, object]]]
) -> None:
    """Await `load` (a service and facts to log about it), start its engine and
    mark the state ready. A backend that cannot load its model must not look
    alive: a failed load ends the process."""
    started = time.monotonic()
    try:
        service, facts = await load
    except Exception:
        log.exception("model_load_failed")
        os._exit(3)
    service.engine.start()
    state.service = service
    state.ready = True
    log.info(
        "backend_ready",
        seconds=round(time.monotonic() - started, 2),
        max_model_len=service.max_model_len,
        **facts,
    )


async def load_into(state: BackendState, config: EngineConfig) -> None:
    """Load the torch engine in a worker thread and serve it."""

    async def load() -> tuple[GenerationService, dict[str, object]]:
        thread = ComputeThread()
        service, runner = await thread.run(build_service, config, thread)
        return service, {
            "num_kv_blocks": runner.num_blocks,
            "device": config.model.device,
            "dtype": str(runner.dtype).removeprefix("torch."),
            "quant": runner.quant,
        }

    await serve_when_loaded(state, load())
