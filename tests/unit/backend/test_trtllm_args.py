"""Config and requests translated into TensorRT-LLM LLM API arguments, asserted exactly."""

from __future__ import annotations

import re

import pytest

from backend.config import CacheConfig, EngineConfig, ModelConfig, TrtllmConfig
from backend.engine.request import SamplingParams
from backend.engine.trtllm.args import kv_cache_kwargs, llm_kwargs, prompt_input, sampling_kwargs
from backend.main import build_parser, config_from_args

CKPT = "/models/Llama-3.1-8B-Instruct-FP8"


def trt_config(**trtllm: object) -> EngineConfig:
    return EngineConfig(
        engine="tensorrt_llm",
        model=ModelConfig(path=CKPT, served_names=("llama",)),
        trtllm=TrtllmConfig(**trtllm),  # type: ignore[arg-type]
    )


def test_llm_kwargs_defaults() -> None:
    assert llm_kwargs(trt_config(), max_seq_len=131072) == {
        "model": CKPT,
        "backend": "pytorch",
        "tensor_parallel_size": 1,
        "dtype": "auto",
        "max_batch_size": 256,
        "max_num_tokens": 8192,
        "max_seq_len": 131072,
        "enable_chunked_prefill": True,
        "enable_iter_perf_stats": True,
    }


def test_llm_kwargs_carry_parallelism_batch_limits_and_dtype() -> None:
    config = EngineConfig(
        engine="tensorrt_llm",
        model=ModelConfig(path=CKPT, dtype="bfloat16"),
        trtllm=TrtllmConfig(tensor_parallel_size=4, max_batch_size=64, max_num_tokens=4096),
    )
    kwargs = llm_kwargs(config, max_seq_len=8192)
    assert kwargs["tensor_parallel_size"] == 4
    assert kwargs["max_batch_size"] == 64
    assert kwargs["max_num_tokens"] == 4096
    assert kwargs["max_seq_len"] == 8192
    assert kwargs["dtype"] == "bfloat16"
    # The checkpoint carries its quantization; nothing here asks TensorRT-LLM to quantize.
    assert not {"quant_config", "quantization", "quant_algo"} & kwargs.keys()


def test_kv_cache_kwargs_default_reuse_on() -> None:
    assert kv_cache_kwargs(trt_config()) == {
        "free_gpu_memory_fraction": 0.9,
        "enable_block_reuse": True,
    }


def test_kv_cache_kwargs_cap_and_no_prefix_caching() -> None:
    config = EngineConfig(
        engine="tensorrt_llm",
        model=ModelConfig(path=CKPT),
        cache=CacheConfig(enable_prefix_caching=False),
        trtllm=TrtllmConfig(kv_cache_fraction=0.5, kv_cache_max_tokens=200_000),
    )
    assert kv_cache_kwargs(config) == {
        "free_gpu_memory_fraction": 0.5,
        "enable_block_reuse": False,
        "max_tokens": 200_000,
    }


def test_sampling_kwargs_for_sampling() -> None:
    sampling = SamplingParams(
        max_tokens=64,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        seed=1234,
        stop_token_ids=frozenset({128009, 128001}),
        stop=("\n\n", "User:"),
    )
    assert sampling_kwargs(sampling, fallback_seed=99) == {
        "max_tokens": 64,
        "n": 1,
        "seed": 1234,
        "stop_token_ids": [128001, 128009],
        "ignore_eos": False,
        "detokenize": False,
        "include_stop_str_in_output": True,
        "stop": ["\n\n", "User:"],
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
    }


def test_sampling_kwargs_defaults_leave_top_k_off_and_draw_a_seed() -> None:
    sampling = SamplingParams(max_tokens=16, stop_token_ids=frozenset({2}))
    assert sampling_kwargs(sampling, fallback_seed=424242) == {
        "max_tokens": 16,
        "n": 1,
        "seed": 424242,
        "stop_token_ids": [2],
        "ignore_eos": False,
        "detokenize": False,
        "include_stop_str_in_output": True,
        "temperature": 1.0,
        "top_p": 1.0,
    }


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(max_tokens=8, temperature=0.0, top_p=0.5, top_k=50),
        SamplingParams(max_tokens=8, temperature=0.8, top_k=1),
    ],
    ids=["temperature-0", "top-k-1"],
)
def test_sampling_kwargs_greedy_is_top_k_1_without_temperature_or_top_p(
    sampling: SamplingParams,
) -> None:
    assert sampling_kwargs(sampling, fallback_seed=7) == {
        "max_tokens": 8,
        "n": 1,
        "seed": 7,
        "stop_token_ids": [],
        "ignore_eos": False,
        "detokenize": False,
        "include_stop_str_in_output": True,
        "top_k": 1,
    }


def test_sampling_kwargs_ignore_eos() -> None:
    kwargs = sampling_kwargs(
        SamplingParams(max_tokens=100, ignore_eos=True, temperature=0), fallback_seed=1
    )
    assert kwargs["ignore_eos"] is True
    assert kwargs["stop_token_ids"] == []


def test_sampling_kwargs_never_ask_for_logprobs_or_several_choices() -> None:
    kwargs = sampling_kwargs(SamplingParams(), fallback_seed=0)
    assert kwargs["n"] == 1
    assert "logprobs" not in kwargs and "best_of" not in kwargs


def test_prompt_input_is_a_token_prompt() -> None:
    assert prompt_input([1, 2, 3]) == {"prompt_token_ids": [1, 2, 3]}


# --- the command line --------------------------------------------------------


def parse(*argv: str) -> EngineConfig:
    return config_from_args(build_parser().parse_args(list(argv)))


def test_cli_defaults_keep_the_torch_engine() -> None:
    config = parse()
    assert config.engine == "torch"
    assert config.scheduler.max_num_seqs == 32
    assert config.scheduler.max_num_batched_tokens == 512
    assert config.scheduler.max_model_len == 2048
    assert config.model.served_names == ("smollm2",)


def test_cli_tensorrt_llm_defaults() -> None:
    config = parse("--engine", "tensorrt_llm", "--model", CKPT + "/")
    assert config.engine == "tensorrt_llm"
    assert config.trtllm == TrtllmConfig(
        tensor_parallel_size=1,
        max_batch_size=256,
        max_num_tokens=8192,
        max_seq_len=None,
        kv_cache_fraction=0.9,
        kv_cache_max_tokens=None,
    )
    assert config.model.served_names == ("Llama-3.1-8B-Instruct-FP8",)
    assert config.cache.enable_prefix_caching is True


def test_cli_shared_flags_map_onto_tensorrt_llm() -> None:
    config = parse(
        "--engine",
        "tensorrt_llm",
        "--model",
        CKPT,
        "--served-name",
        "llama-fp8",
        "--max-num-seqs",
        "128",
        "--max-num-batched-tokens",
        "16384",
        "--max-model-len",
        "32768",
        "--max-waiting",
        "1000",
        "--tensor-parallel-size",
        "2",
        "--trtllm-kv-cache-fraction",
        "0.8",
        "--trtllm-kv-cache-max-tokens",
        "500000",
        "--no-prefix-caching",
        "--dtype",
        "bfloat16",
    )
    assert config.trtllm == TrtllmConfig(
        tensor_parallel_size=2,
        max_batch_size=128,
        max_num_tokens=16384,
        max_seq_len=32768,
        kv_cache_fraction=0.8,
        kv_cache_max_tokens=500_000,
    )
    assert config.scheduler.max_waiting == 1000
    assert config.model.served_names == ("llama-fp8",)
    assert llm_kwargs(config, max_seq_len=32768)["dtype"] == "bfloat16"
    assert kv_cache_kwargs(config) == {
        "free_gpu_memory_fraction": 0.8,
        "enable_block_reuse": False,
        "max_tokens": 500_000,
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--engine", "tensorrt_llm"], "needs --model"),
        (["--engine", "tensorrt_llm", "--model", CKPT, "--quant", "fp8"], "reads the quantization"),
        (
            ["--engine", "tensorrt_llm", "--model", CKPT, "--kv-cache-dtype", "bfloat16"],
            "takes the KV cache type from the checkpoint",
        ),
        (["--tensor-parallel-size", "2"], "needs --engine tensorrt_llm"),
        (
            ["--engine", "tensorrt_llm", "--model", CKPT, "--trtllm-kv-cache-fraction", "1.5"],
            "must be in (0, 1]",
        ),
        (
            ["--engine", "tensorrt_llm", "--model", CKPT, "--tensor-parallel-size", "0"],
            "at least 1",
        ),
    ],
)
def test_cli_refuses_what_the_engine_cannot_honour(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse(*argv)
