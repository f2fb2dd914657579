"""What a checkpoint folder says about itself: quantization and context length.

TensorRT-LLM reads a ModelOpt checkpoint's quantization on its own (from
`hf_quant_config.json`, or the `quantization_config` that newer ModelOpt
exports put in `config.json`); the engine never asks it to quantize. These
functions only read the same files to log what will run, to refuse what
cannot (a GGUF file, a folder without `config.json`), and to know the context
length before TensorRT-LLM is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QUANT_CONFIG_FILE = "hf_quant_config.json"


class CheckpointError(ValueError):
    """The model path is not a checkpoint folder the tensorrt_llm engine can load."""


@dataclass(frozen=True)
class CheckpointInfo:
    """The few facts about a checkpoint the engine needs before loading it."""

    quantization: str | None
    """The weights' quantization as the checkpoint names it ("FP8", "NVFP4",
    "W4A16_AWQ", ...); None for unquantized weights."""
    kv_cache_quantization: str | None
    """The KV cache's quantization ("FP8", ...); None when the cache is not quantized."""
    max_position_embeddings: int | None
    """The longest sequence the model was trained for, if the config says."""


def _section(data: Mapping[str, Any] | None, key: str) -> Mapping[str, Any]:
    value = data.get(key) if data else None
    return value if isinstance(value, Mapping) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def describe_checkpoint(
    config: Mapping[str, Any], hf_quant_config: Mapping[str, Any] | None
) -> CheckpointInfo:
    """Read quantization and context length from a parsed `config.json` and
    `hf_quant_config.json` (None when the folder has none)."""
    modelopt = _section(hf_quant_config, "quantization")
    embedded = _section(config, "quantization_config")
    if modelopt:
        quant = _text(modelopt.get("quant_algo"))
        kv_quant = _text(modelopt.get("kv_cache_quant_algo"))
    elif embedded.get("quant_method") == "modelopt":
        quant = _text(embedded.get("quant_algo"))
        kv_quant = _text(embedded.get("kv_cache_quant_algo"))
    else:
        # Another tool's quantization (or none): TensorRT-LLM decides whether
        # it can run it; report the method for the log.
        quant = _text(embedded.get("quant_method"))
        kv_quant = None
    max_len = config.get("max_position_embeddings")
    if not isinstance(max_len, int):
        max_len = _section(config, "text_config").get("max_position_embeddings")
    return CheckpointInfo(
        quantization=quant,
        kv_cache_quantization=kv_quant,
        max_position_embeddings=max_len if isinstance(max_len, int) and max_len > 0 else None,
    )


def resolve_max_seq_len(requested: int | None, info: CheckpointInfo) -> int:
    """`--max-model-len` when given, else the checkpoint's own limit."""
    if requested is not None:
        return requested
    if info.max_position_embeddings is None:
        raise CheckpointError(
            "the checkpoint's config.json has no max_position_embeddings; pass --max-model-len"
        )
    return info.max_position_embeddings


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def read_checkpoint(model_dir: Path) -> CheckpointInfo:
    """Describe the checkpoint folder at `model_dir`; raises CheckpointError."""
    if not model_dir.is_dir():
        raise CheckpointError(
            f"--engine tensorrt_llm needs a Hugging Face checkpoint folder, not {model_dir} "
            "(GGUF files are for the torch engine)"
        )
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json")
    quant_path = model_dir / QUANT_CONFIG_FILE
    hf_quant = _read_json(quant_path) if quant_path.is_file() else None
    return describe_checkpoint(_read_json(config_path), hf_quant)
