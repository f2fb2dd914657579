"""Builds the `tensorrt_llm` engine: the only module that imports `tensorrt_llm`."""

from __future__ import annotations

from pathlib import Path

import structlog

from backend.api.server import BackendState
from backend.bootstrap import serve_when_loaded
from backend.config import EngineConfig
from backend.engine.trtllm.args import kv_cache_kwargs, llm_kwargs
from backend.engine.trtllm.checkpoint import read_checkpoint, resolve_max_seq_len
from backend.engine.trtllm.engine import TrtllmEngine
from backend.engine.trtllm.stats import StatsLimits
from backend.serving.generation import GenerationService
from backend.serving.metrics import EngineMetrics
from backend.tokenizer import Tokenizer

log = structlog.get_logger(__name__)


def build_trtllm_service(config: EngineConfig) -> GenerationService:
    """Load the checkpoint into TensorRT-LLM and wire engine, metrics and service.

    Blocking for as long as TensorRT-LLM loads (minutes for an 8B model).
    Raises CheckpointError for a path that is not a checkpoint folder.
    """
    from tensorrt_llm import LLM, SamplingParams
    from tensorrt_llm.llmapi import KvCacheConfig

    assert config.model.path is not None  # EngineConfig refuses tensorrt_llm without one
    model_dir = Path(config.model.path)
    info = read_checkpoint(model_dir)
    max_seq_len = resolve_max_seq_len(config.trtllm.max_seq_len, info)
    # The same tokenizer files TensorRT-LLM loads; the serving layer uses it
    # for the chat template, prompt ids and streaming detokenization.
    tokenizer = Tokenizer.from_dir(model_dir)
    log.info(
        "trtllm_loading",
        model=str(model_dir),
        quantization=info.quantization or "none",
        kv_cache_quantization=info.kv_cache_quantization or "none",
        tensor_parallel_size=config.trtllm.tensor_parallel_size,
        max_seq_len=max_seq_len,
    )
    llm = LLM(
        **llm_kwargs(config, max_seq_len=max_seq_len),
        kv_cache_config=KvCacheConfig(**kv_cache_kwargs(config)),
    )
    limits = StatsLimits(
        max_num_seqs=config.trtllm.max_batch_size,
        max_waiting=config.scheduler.max_waiting,
        max_model_len=max_seq_len,
    )
    engine = TrtllmEngine(llm, SamplingParams, limits)
    metrics = EngineMetrics(config.model.served_names[0], lambda: engine.stats)
    return GenerationService(engine, tokenizer, max_model_len=max_seq_len, metrics=metrics)


async def load_trtllm_into(state: BackendState, config: EngineConfig) -> None:
    """Load the checkpoint and serve it.

    Unlike the torch engine, the LLM is built on the event loop's own (main)
    thread, which blocks HTTP while it loads: that is where `trtllm-serve`
    and NVIDIA Dynamo build it too, and where the LLM API sets up its worker
    processes and binds its asynchronous results to the loop.
    """

    async def load() -> tuple[GenerationService, dict[str, object]]:
        service = build_trtllm_service(config)
        return service, {
            "engine": "tensorrt_llm",
            "num_kv_blocks": service.engine.stats.num_total_blocks,
        }

    await serve_when_loaded(state, load())
