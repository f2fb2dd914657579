"""`tollgate backend`: serve a model with the built-in torch engine, or with
TensorRT-LLM (`--engine tensorrt_llm`) where it is installed.

The HTTP server starts at once so `/health` answers while the torch engine
loads; `/ready` turns 200 once the weights are loaded and one warm-up step has
run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

from backend.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, TrtllmConfig

log = structlog.get_logger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The backend's command line; every engine knob is documented here."""
    p = argparse.ArgumentParser(
        prog="tollgate backend",
        description="Serve a Llama-family model (GGUF file or Hugging Face safetensors folder) "
        "over the OpenAI API with a continuous-batching engine and a paged KV cache. "
        "Without --model, serves the bundled SmolLM2-135M-Instruct.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default=os.environ.get("TOLLGATE_BACKEND_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("TOLLGATE_BACKEND_PORT", "8081")))
    p.add_argument(
        "--model", default=None, help="GGUF file or safetensors folder (default: bundled)"
    )
    p.add_argument(
        "--served-name",
        action="append",
        dest="served_names",
        help="model name clients use; repeat for aliases (default: smollm2)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and KV dtype; auto = bf16 where the hardware runs it natively, else fp32",
    )
    p.add_argument(
        "--quant",
        default="auto",
        choices=["auto", "none", "int4", "fp8", "int8"],
        help="quantized linear layers: int4 or fp8 weights (any device), or int8 weights "
        "and activations through fbgemm's int8 GEMM (CPU only); auto = int4 for a GGUF "
        "file stored as Q4_1 where a fused int4 kernel runs (bfloat16 CPU, CUDA), else none",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replay decode steps as CUDA graphs (torch engine on CUDA; no effect on CPU)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="run decode steps through torch.compile (torch engine on CPU; needs a C++ "
        "compiler; the first start compiles for a minute or two, restarts reuse the cache)",
    )
    # Engine-dependent defaults: SUPPRESS leaves the attribute unset when the
    # flag is not given, and config_from_args picks the engine's default.
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=argparse.SUPPRESS,
        help="most requests running at once (default: 32; tensorrt_llm: 256)",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=argparse.SUPPRESS,
        help="per-step token budget; prefills are chunked to fit "
        "(default: 512; tensorrt_llm: 8192)",
    )
    p.add_argument(
        "--max-waiting",
        type=int,
        default=256,
        help="waiting-queue bound; beyond it requests get 429",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=argparse.SUPPRESS,
        help="prompt + completion limit "
        "(default: 2048; tensorrt_llm: the checkpoint's max_position_embeddings)",
    )
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--kv-cache-bytes", type=int, default=1024**3, help="KV pool size in bytes")
    size.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks")
    p.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    p.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="element type of cached keys and values (auto: the model's dtype)",
    )
    trt = p.add_argument_group(
        "TensorRT-LLM",
        "--engine tensorrt_llm serves a Hugging Face checkpoint folder (FP8, NVFP4 or INT4 AWQ "
        "when quantized with NVIDIA ModelOpt; the quantization is read from the checkpoint) "
        "through TensorRT-LLM's LLM API. It runs in NVIDIA's release image "
        "nvcr.io/nvidia/tensorrt-llm/release (docs/tensorrt-llm.md). --max-num-seqs, "
        "--max-num-batched-tokens, --max-model-len, --max-waiting, --dtype and "
        "--no-prefix-caching apply to it; the KV-cache size flags above do not.",
    )
    trt.add_argument(
        "--engine",
        default="torch",
        choices=["torch", "tensorrt_llm"],
        help="torch: the built-in engine; tensorrt_llm: TensorRT-LLM on NVIDIA GPUs",
    )
    trt.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="GPUs to split the model across"
    )
    trt.add_argument(
        "--trtllm-kv-cache-fraction",
        type=float,
        default=0.9,
        help="fraction of the GPU memory left after the weights that the KV cache takes",
    )
    trt.add_argument(
        "--trtllm-kv-cache-max-tokens",
        type=int,
        default=None,
        help="cap on the tokens the KV cache holds (the smaller of this and the fraction wins)",
    )
    p.add_argument("--log-level", default="info")
    return p


def _default_served_name(args: argparse.Namespace) -> str:
    """The bundled model's name; a TensorRT-LLM checkpoint is named after its folder."""
    if args.engine == "tensorrt_llm" and args.model:
        return Path(args.model).name or "model"
    return "smollm2"


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    """Map parsed arguments onto the engine's config dataclasses.

    Flags shared by both engines that were not given take the chosen engine's
    default; raises ValueError for settings the engine cannot honour.
    """
    max_num_seqs = getattr(args, "max_num_seqs", None)
    max_num_batched_tokens = getattr(args, "max_num_batched_tokens", None)
    max_model_len = getattr(args, "max_model_len", None)
    torch_cfg = SchedulerConfig()
    trt_cfg = TrtllmConfig()
    return EngineConfig(
        engine=args.engine,
        model=ModelConfig(
            path=args.model,
            served_names=tuple(args.served_names or [_default_served_name(args)]),
            dtype=args.dtype,
            device=args.device,
            quant=args.quant,
            num_threads=args.threads,
            cuda_graphs=args.cuda_graphs,
            compile=args.compile,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=_or(max_num_seqs, torch_cfg.max_num_seqs),
            max_num_batched_tokens=_or(max_num_batched_tokens, torch_cfg.max_num_batched_tokens),
            max_waiting=args.max_waiting,
            max_model_len=_or(max_model_len, torch_cfg.max_model_len),
        ),
        cache=CacheConfig(
            block_size=args.block_size,
            num_blocks=args.num_kv_blocks,
            cache_bytes=args.kv_cache_bytes,
            enable_prefix_caching=not args.no_prefix_caching,
            dtype=args.kv_cache_dtype,
        ),
        trtllm=TrtllmConfig(
            tensor_parallel_size=args.tensor_parallel_size,
            max_batch_size=_or(max_num_seqs, trt_cfg.max_batch_size),
            max_num_tokens=_or(max_num_batched_tokens, trt_cfg.max_num_tokens),
            max_seq_len=max_model_len,
            kv_cache_fraction=args.trtllm_kv_cache_fraction,
            kv_cache_max_tokens=args.trtllm_kv_cache_max_tokens,
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments and serve until interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    if config.engine == "tensorrt_llm":
        from backend.engine.trtllm.availability import (
            EngineUnavailableError,
            require_tensorrt_llm,
        )

        try:
            # Imported here, in the main thread and before the server starts:
            # a missing or broken install is one clear line, not a traceback.
            require_tensorrt_llm()
        except EngineUnavailableError as exc:
            print(f"{parser.prog}: {exc}", file=sys.stderr)
            return 2
    import uvicorn

    from backend.api.server import BackendState, create_app

    if config.engine == "tensorrt_llm":
        from backend.engine.trtllm.load import load_trtllm_into as load_into
    else:
        from backend.bootstrap import load_into

    state = BackendState(config.model.served_names)
    app = create_app(state)

    async def load_on_startup() -> None:
        asyncio.get_running_loop().create_task(load_into(state, config))

    async def stop_engine() -> None:
        if state.service is not None:
            await state.service.engine.stop()

    app.on_startup.append(load_on_startup)
    app.on_shutdown.append(stop_engine)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
