"""Reading a ModelOpt checkpoint's quantization and context length."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backend.engine.trtllm.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    describe_checkpoint,
    read_checkpoint,
    resolve_max_seq_len,
)

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "max_position_embeddings": 131072,
    "model_type": "llama",
    "torch_dtype": "bfloat16",
}


def modelopt(quant_algo: str, kv: str | None = None, **extra: object) -> dict[str, object]:
    """An hf_quant_config.json as ModelOpt writes it."""
    return {
        "producer": {"name": "modelopt", "version": "0.21.0"},
        "quantization": {
            "quant_algo": quant_algo,
            "kv_cache_quant_algo": kv,
            "exclude_modules": ["lm_head"],
            **extra,
        },
    }


@pytest.mark.parametrize(
    ("quant_config", "quant", "kv"),
    [
        (modelopt("FP8", "FP8"), "FP8", "FP8"),
        (modelopt("NVFP4", None, group_size=16), "NVFP4", None),
        (modelopt("W4A16_AWQ", None, group_size=128, has_zero_point=False), "W4A16_AWQ", None),
    ],
    ids=["fp8", "nvfp4", "int4-awq"],
)
def test_modelopt_hf_quant_config(quant_config: dict[str, object], quant: str, kv: str) -> None:
    assert describe_checkpoint(LLAMA_CONFIG, quant_config) == CheckpointInfo(
        quantization=quant, kv_cache_quantization=kv, max_position_embeddings=131072
    )


def test_modelopt_quantization_embedded_in_config() -> None:
    config = {
        **LLAMA_CONFIG,
        "quantization_config": {
            "quant_method": "modelopt",
            "quant_algo": "FP8",
            "kv_cache_quant_algo": "FP8",
        },
    }
    assert describe_checkpoint(config, None).quantization == "FP8"
    assert describe_checkpoint(config, None).kv_cache_quantization == "FP8"


def test_unquantized_and_other_tools() -> None:
    assert describe_checkpoint(LLAMA_CONFIG, None) == CheckpointInfo(None, None, 131072)
    other = {**LLAMA_CONFIG, "quantization_config": {"quant_method": "compressed-tensors"}}
    assert describe_checkpoint(other, None).quantization == "compressed-tensors"


def test_context_length_from_a_nested_text_config() -> None:
    config = {"model_type": "mllama", "text_config": {"max_position_embeddings": 8192}}
    assert describe_checkpoint(config, None).max_position_embeddings == 8192


def test_resolve_max_seq_len() -> None:
    info = CheckpointInfo(None, None, 131072)
    assert resolve_max_seq_len(None, info) == 131072
    assert resolve_max_seq_len(8192, info) == 8192
    with pytest.raises(CheckpointError, match="--max-model-len"):
        resolve_max_seq_len(None, CheckpointInfo(None, None, None))


def test_read_checkpoint_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    (tmp_path / "hf_quant_config.json").write_text(json.dumps(modelopt("FP8", "FP8")))
    assert read_checkpoint(tmp_path) == CheckpointInfo("FP8", "FP8", 131072)


def test_read_checkpoint_refuses_a_file_or_a_folder_without_config(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="GGUF files are for the torch engine"):
        read_checkpoint(gguf)
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        read_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        read_checkpoint(tmp_path)
