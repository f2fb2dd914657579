"""`tollgate backend`: serve a model with the built-in torch engine.

The HTTP server starts at once so `/health` answers while the model loads;
`/ready` turns 200 once the weights are loaded and one warm-up step has run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

import structlog

from backend.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

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
        default="none",
        choices=["none", "int4", "fp8", "int8"],
        help="quantized linear layers: int4 or fp8 weights (any device), or int8 weights "
        "and activations through fbgemm's int8 GEMM (CPU only)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-num-seqs", type=int, default=32, help="most requests running at once")
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=512,
        help="per-step token budget; prefills are chunked to fit",
    )
    p.add_argument(
        "--max-waiting",
        type=int,
        default=256,
        help="waiting-queue bound; beyond it requests get 429",
    )
    p.add_argument("--max-model-len", type=int, default=2048, help="prompt + completion limit")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--kv-cache-bytes", type=int, default=256 * 1024 * 1024, help="KV pool size in bytes"
    )
    size.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks")
    p.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    p.add_argument("--log-level", default="info")
    return p


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    """Map parsed arguments onto the engine's config dataclasses."""
    return EngineConfig(
        model=ModelConfig(
            path=args.model,
            served_names=tuple(args.served_names or ["smollm2"]),
            dtype=args.dtype,
            device=args.device,
            quant=args.quant,
            num_threads=args.threads,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_waiting=args.max_waiting,
            max_model_len=args.max_model_len,
        ),
        cache=CacheConfig(
            block_size=args.block_size,
            num_blocks=args.num_kv_blocks,
            cache_bytes=args.kv_cache_bytes,
            enable_prefix_caching=not args.no_prefix_caching,
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
    import uvicorn

    from backend.api.server import BackendState, create_app
    from backend.bootstrap import load_into

    state = BackendState(config.model.served_names)
    app = create_app(state)

    async def load_on_startup() -> None:
        asyncio.get_running_loop().create_task(load_into(state, config))

    app.on_startup.append(load_on_startup)
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
