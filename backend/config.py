"""Engine configuration: the knobs `tollgate backend --help` documents."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Quant = Literal["none", "int4", "fp8", "int8"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits the scheduler enforces on every step."""

    max_num_seqs: int = 32
    """Most requests running (holding KV blocks) at once."""
    max_num_batched_tokens: int = 512
    """Per-step token budget: decodes take one each, prefills are chunked into the rest."""
    max_waiting: int = 256
    """Most requests waiting for admission; one more is refused (HTTP 429)."""
    max_model_len: int = 2048
    """Longest prompt + completion, in tokens."""


@dataclass(frozen=True)
class CacheConfig:
    """Size and shape of the paged KV cache."""

    block_size: int = 16
    """Tokens per KV block."""
    num_blocks: int | None = None
    """KV blocks in the pool; when None, derived from `cache_bytes`."""
    cache_bytes: int = 256 * 1024 * 1024
    """KV pool size in bytes, used when `num_blocks` is None."""
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to run and how."""

    path: str | None = None
    """A GGUF file or a Hugging Face safetensors folder; None means the bundled SmolLM2."""
    served_names: tuple[str, ...] = ("smollm2",)
    dtype: DType = "auto"
    """"auto": bfloat16 on CUDA and on CPUs with native bf16 (AVX512_BF16/AMX), else float32."""
    device: str = "cpu"
    quant: Quant = "none"
    """Quantized linears: int4/fp8 weight-only on any device; int8 (fbgemm) on CPU only."""
    num_threads: int | None = None
    """torch intra-op threads on CPU; None keeps torch's default."""

    def __post_init__(self) -> None:
        """Refuse a quantization the device cannot run, before anything is loaded."""
        device_type = self.device.partition(":")[0]
        if self.quant == "int8" and device_type != "cpu":
            raise ValueError(
                f"--quant int8 runs on CPU only (fbgemm's int8 GEMM), not on {device_type}; "
                "use --quant fp8 or int4 on a GPU"
            )


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to start."""

    model: ModelConfig = field(default_factory=ModelConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
