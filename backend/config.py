"""Engine configuration: the knobs `tollgate backend --help` documents."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

WeightQuant = Literal["none", "int4", "fp8", "int8"]
"""How a loaded model's linears are stored."""
Quant = Literal["auto", WeightQuant]
"""What `--quant` accepts; "auto" resolves to a `WeightQuant` at load time."""
DType = Literal["auto", "float32", "bfloat16", "float16"]
EngineKind = Literal["torch", "tensorrt_llm"]


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
    cache_bytes: int = 1024 * 1024 * 1024
    """KV pool size in bytes, used when `num_blocks` is None. 1 GiB holds about 23,000
    float32 tokens of the bundled model: `max_num_seqs` (32) requests of 700 tokens run
    at once. Pages are touched only as blocks fill, so an idle pool costs little RSS."""
    enable_prefix_caching: bool = True
    dtype: DType = "auto"
    """Element type of the cached keys and values; "auto" is the model's dtype.
    "bfloat16" under a float32 model halves the bytes that decode attention
    reads, which on a CPU is most of its time at high concurrency."""


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to run and how."""

    path: str | None = None
    """A GGUF file or a Hugging Face safetensors folder; None means the bundled SmolLM2."""
    served_names: tuple[str, ...] = ("smollm2",)
    dtype: DType = "auto"
    """"auto": bfloat16 on CUDA and on CPUs with native bf16 (AVX512_BF16/AMX), else float32."""
    device: str = "cpu"
    quant: Quant = "auto"
    """Quantized linears: int4/fp8 weight-only on any device; int8 (fbgemm) on CPU only.
    "auto" serves a GGUF file whose layer weights are all Q4_1 as int4 (the file's
    own 4-bit values, exactly) where a fused int4 kernel runs, and anything else
    unquantized (`backend.models.loader.resolve_quant`)."""
    num_threads: int | None = None
    """torch intra-op threads on CPU; None keeps torch's default."""
    cuda_graphs: bool = True
    """Replay decode steps as CUDA graphs on CUDA (with Triton); ignored on CPU."""
    compile: bool = False
    """Run decode steps through torch.compile on CPU (a C++ compiler is needed;
    the first start compiles for a minute or two, later ones reuse the cache)."""

    def __post_init__(self) -> None:
        """Refuse a quantization the device cannot run, before anything is loaded."""
        device_type = self.device.partition(":")[0]
        if self.quant == "int8" and device_type != "cpu":
            raise ValueError(
                f"--quant int8 runs on CPU only (fbgemm's int8 GEMM), not on {device_type}; "
                "use --quant fp8 or int4 on a GPU"
            )


@dataclass(frozen=True)
class TrtllmConfig:
    """Settings of the `tensorrt_llm` engine (TensorRT-LLM's LLM API, PyTorch backend).

    The quantization (FP8, NVFP4, INT4 AWQ) is read from the ModelOpt
    checkpoint itself, never chosen here.
    """

    tensor_parallel_size: int = 1
    """GPUs the model is split across."""
    max_batch_size: int = 256
    """Most requests in a batch (`--max-num-seqs`)."""
    max_num_tokens: int = 8192
    """Per-iteration token budget (`--max-num-batched-tokens`)."""
    max_seq_len: int | None = None
    """Longest prompt + completion (`--max-model-len`); None: the checkpoint's
    `max_position_embeddings`."""
    kv_cache_fraction: float = 0.9
    """Fraction of the GPU memory left after loading the weights that the KV cache takes."""
    kv_cache_max_tokens: int | None = None
    """Cap on the tokens the KV cache holds; the smaller of this and the fraction wins."""

    def __post_init__(self) -> None:
        """Refuse values TensorRT-LLM would reject later, after minutes of loading."""
        if not 0.0 < self.kv_cache_fraction <= 1.0:
            raise ValueError(
                f"--trtllm-kv-cache-fraction must be in (0, 1], not {self.kv_cache_fraction}"
            )
        for name, value in (
            ("--tensor-parallel-size", self.tensor_parallel_size),
            ("--max-num-seqs", self.max_batch_size),
            ("--max-num-batched-tokens", self.max_num_tokens),
            ("--max-model-len", self.max_seq_len),
            ("--trtllm-kv-cache-max-tokens", self.kv_cache_max_tokens),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to start."""

    model: ModelConfig = field(default_factory=ModelConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    engine: EngineKind = "torch"
    """`torch`: the built-in engine; `tensorrt_llm`: TensorRT-LLM where it is installed."""
    trtllm: TrtllmConfig = field(default_factory=TrtllmConfig)
    """Used by the `tensorrt_llm` engine only."""

    def __post_init__(self) -> None:
        """Refuse settings the chosen engine cannot honour, before anything is loaded."""
        if self.engine == "torch":
            if self.trtllm.tensor_parallel_size != 1:
                raise ValueError("--tensor-parallel-size needs --engine tensorrt_llm")
            return
        if self.model.path is None:
            raise ValueError(
                "--engine tensorrt_llm needs --model: a Hugging Face checkpoint folder "
                "(for FP8, NVFP4 or INT4 AWQ, one quantized with NVIDIA ModelOpt)"
            )
        if self.model.quant not in ("auto", "none"):
            raise ValueError(
                "--quant is for the torch engine; the tensorrt_llm engine reads the "
                "quantization from the checkpoint (use a ModelOpt-quantized one)"
            )
        if self.cache.dtype != "auto":
            raise ValueError(
                "--kv-cache-dtype is for the torch engine; the tensorrt_llm engine takes "
                "the KV cache type from the checkpoint (ModelOpt's kv_cache_quant_algo)"
            )
