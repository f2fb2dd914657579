"""Tollgate's config and requests as keyword arguments of TensorRT-LLM's LLM API.

Pure functions returning plain dicts: `load.py` passes them to
`tensorrt_llm.LLM(...)`, `tensorrt_llm.llmapi.KvCacheConfig(...)` and
`tensorrt_llm.SamplingParams(...)`. Field names follow the LLM API of the
PyTorch backend (TensorRT-LLM 1.x).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from backend.config import EngineConfig
from backend.engine.request import SamplingParams


def llm_kwargs(config: EngineConfig, *, max_seq_len: int) -> dict[str, Any]:
    """Arguments of `tensorrt_llm.LLM` for `config`, the KV cache's aside.

    No quantization argument: TensorRT-LLM reads it from the ModelOpt
    checkpoint, and this engine never quantizes weights itself.
    """
    trt = config.trtllm
    return {
        "model": config.model.path,
        "backend": "pytorch",
        "tensor_parallel_size": trt.tensor_parallel_size,
        "dtype": config.model.dtype,
        "max_batch_size": trt.max_batch_size,
        "max_num_tokens": trt.max_num_tokens,
        "max_seq_len": max_seq_len,
        # Prompts longer than max_num_tokens are then prefilled in chunks
        # instead of refused, as in the torch engine.
        "enable_chunked_prefill": True,
        # Without it the LLM API publishes no iteration stats, and /stats
        # would have no KV-cache figures.
        "enable_iter_perf_stats": True,
    }


def kv_cache_kwargs(config: EngineConfig) -> dict[str, Any]:
    """Arguments of `tensorrt_llm.llmapi.KvCacheConfig` for `config`."""
    trt = config.trtllm
    kwargs: dict[str, Any] = {
        "free_gpu_memory_fraction": trt.kv_cache_fraction,
        "enable_block_reuse": config.cache.enable_prefix_caching,
    }
    if trt.kv_cache_max_tokens is not None:
        kwargs["max_tokens"] = trt.kv_cache_max_tokens
    return kwargs


def sampling_kwargs(sampling: SamplingParams, *, fallback_seed: int) -> dict[str, Any]:
    """Arguments of `tensorrt_llm.SamplingParams` for one request.

    - `fallback_seed` is used when the client gave no seed: TensorRT-LLM's
      default seed is a constant, which would make every unseeded request
      with the same prompt sample the same text.
    - Text is not detokenized by TensorRT-LLM: the serving layer decodes the
      token ids with the same tokenizer, stop-string matcher and UTF-8
      hold-back as for the torch engine.
    - Stop strings are passed so generation ends early on the GPU, and kept
      in the output (`include_stop_str_in_output`) so token ids only ever
      grow; the serving layer cuts the text at the stop string.
    - Greedy is `top_k=1` with neither temperature nor top_p, which is what
      the LLM API treats as greedy decoding.
    """
    kwargs: dict[str, Any] = {
        "max_tokens": sampling.max_tokens,
        "n": 1,
        "seed": sampling.seed if sampling.seed is not None else fallback_seed,
        "stop_token_ids": sorted(sampling.stop_token_ids),
        "ignore_eos": sampling.ignore_eos,
        "detokenize": False,
        "include_stop_str_in_output": True,
    }
    if sampling.stop:
        kwargs["stop"] = list(sampling.stop)
    if sampling.greedy:
        kwargs["top_k"] = 1
        return kwargs
    kwargs["temperature"] = sampling.temperature
    kwargs["top_p"] = sampling.top_p
    if sampling.top_k > 0:
        kwargs["top_k"] = sampling.top_k
    return kwargs


def prompt_input(prompt_token_ids: Sequence[int]) -> dict[str, list[int]]:
    """The LLM API's token-ids prompt (`TokensPrompt`): the server already tokenized it."""
    return {"prompt_token_ids": list(prompt_token_ids)}
