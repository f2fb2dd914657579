"""The torch engine on one CUDA GPU: kernel checks, agreement with CPU, speed, HF beside it.

    python bench/gpu.py            # everything (several minutes on an H100)
    python bench/gpu.py --quick    # fewer requests; no 1000/1000 runs for HF generate

Parts, in order; each is guarded, so a failure becomes a row of the table and the
rest still runs:

1. the Triton kernels against their references (`backend.executor.kernels.selfcheck`);
2. a device-to-device copy: the memory bandwidth that bounds decode;
3. the bundled SmolLM2-135M: greedy output on the GPU in float32 must equal the CPU
   engine's; bfloat16's agreement with it is reported;
4. Llama-3.1-8B's architecture with random weights built on the GPU
   (`backend.models.synthetic`), in bf16, FP8 and INT4: batch-1 decode tokens/s
   and its fraction of the bandwidth floor (weight bytes read per step / copy
   bandwidth); in bf16 and FP8, output tokens/s at 128/128 and 1000/1000
   prompt/output tokens with 256 requests in flight, and time to first token at
   32 in flight, through the engine (scheduler, paged KV cache, CUDA graphs,
   sampling) in this process, without HTTP;
5. Hugging Face `generate` in static batches on the same bf16 weights.

The table is printed last and written to docs/benchmarks.md (section `gpu`) unless
`--no-write`. Without a CUDA device the script exits with status 2 and a message.
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from common import (  # type: ignore[import-not-found]
    machine_line,
    markdown_table,
    percentile,
    write_section,
)

TRTLLM_ANCHOR_TOK_S = 28312.0
"""NVIDIA's published TensorRT-LLM figure: Llama-3.1-8B-FP8, 128/128, one H100."""
BUNDLED_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three prime numbers.",
]
BUNDLED_NEW_TOKENS = 48
MAX_MODEL_LEN = 2048
MAX_BATCHED_TOKENS = 8192
KV_RESERVE_BYTES = 6 * 2**30
"""GPU memory kept out of the KV pool: activations, logits, graph pools, sampling."""
BATCH_ONE_PROMPT, BATCH_ONE_OUTPUT = 128, 256
TTFT_PROMPT, TTFT_OUTPUT, TTFT_CONCURRENCY = 512, 128, 32
IN_FLIGHT = 256
HF_LONG_BATCH = 128
"""HF's batch at 1000/1000: 256 sequences of 2000 tokens would not fit its KV cache."""
SEED = 0


@dataclass
class Row:
    """One line of the results table."""

    what: str
    fmt: str
    value: float | str
    unit: str = ""
    notes: str = ""

    def cells(self) -> list[object]:
        """The table cells, numbers rounded for reading."""
        value = self.value
        if isinstance(value, float):
            value = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
        return [self.what, self.fmt, value, self.unit, self.notes]


@dataclass
class Results:
    """Rows collected so far; a failed part is a row too."""

    rows: list[Row] = field(default_factory=list)
    failures: int = 0

    def add(self, row: Row) -> None:
        """Record and echo one row."""
        self.rows.append(row)
        print(" | ".join(str(c) for c in row.cells()), flush=True)

    def fail(self, row: Row) -> None:
        """Record a row whose check failed."""
        self.failures += 1
        self.add(row)

    def guard(self, what: str, fmt: str, part: Callable[[], None]) -> None:
        """Run `part`; on any exception record a failed row, then free GPU memory."""
        import torch

        try:
            part()
        except Exception as exc:  # one broken part must not stop the others
            traceback.print_exc()
            self.fail(Row(what, fmt, "failed", notes=f"{type(exc).__name__}: {exc}"[:200]))
        finally:
            gc.collect()
            torch.cuda.empty_cache()


# -- the engine, driven in this process ------------------------------------------------------


@dataclass(frozen=True)
class Work:
    """One request: prompt token ids and how many tokens to generate."""

    prompt: list[int]
    max_tokens: int


@dataclass
class RunResult:
    """What one closed-loop run measured."""

    wall_s: float
    output_tokens: int
    ttft_s: list[float]
    token_ids: list[list[int]]
    """Generated tokens of each work item, in workload order."""
    token_times: list[list[float]]
    peak_running: int
    preemptions: int

    @property
    def tok_s(self) -> float:
        """Output tokens per second of wall time."""
        return self.output_tokens / self.wall_s


def workload(n: int, prompt_len: int, output_len: int, vocab: int, seed: int = SEED) -> list[Work]:
    """`n` requests of random token ids, generated greedily to their full length."""
    rng = random.Random(seed)
    return [
        Work([rng.randrange(100, vocab) for _ in range(prompt_len)], output_len) for _ in range(n)
    ]


def drive(core: Any, works: Sequence[Work], concurrency: int) -> RunResult:
    """Keep `concurrency` requests in flight until every work item has finished."""
    from backend.engine.request import Request, SamplingParams

    pending = list(range(len(works) - 1, -1, -1))
    submitted: dict[str, float] = {}
    index_of: dict[str, int] = {}
    token_ids: list[list[int]] = [[] for _ in works]
    token_times: list[list[float]] = [[] for _ in works]
    in_flight = peak = output_tokens = 0

    def submit() -> None:
        nonlocal in_flight
        index = pending.pop()
        request_id = f"bench-{index}-{time.monotonic_ns()}"
        work = works[index]
        params = SamplingParams(max_tokens=work.max_tokens, temperature=0.0, ignore_eos=True)
        core.add_request(Request(request_id, list(work.prompt), params))
        submitted[request_id] = time.perf_counter()
        index_of[request_id] = index
        in_flight += 1

    preempted_before = core.scheduler.num_preemptions_total
    start = time.perf_counter()
    while pending and in_flight < concurrency:
        submit()
    while core.has_unfinished():
        updates = core.step()
        now = time.perf_counter()
        peak = max(peak, len(core.scheduler.running))
        for update in updates:
            index = index_of[update.request_id]
            if update.new_token_ids:
                token_ids[index] += update.new_token_ids
                token_times[index] += [now] * len(update.new_token_ids)
                output_tokens += len(update.new_token_ids)
            if update.finished:
                in_flight -= 1
                if pending:
                    submit()
    wall = time.perf_counter() - start
    ttft = [
        token_times[index][0] - submitted[rid]
        for rid, index in index_of.items()
        if token_times[index]
    ]
    return RunResult(
        wall_s=wall,
        output_tokens=output_tokens,
        ttft_s=ttft,
        token_ids=token_ids,
        token_times=token_times,
        peak_running=peak,
        preemptions=core.scheduler.num_preemptions_total - preempted_before,
    )


def build_engine(
    model: Any,
    max_num_seqs: int,
    *,
    num_blocks: int | None = None,
    kv_bytes: int | None = None,
    device: str = "cuda",
    dtype: str = "auto",
    cuda_graphs: bool = True,
    max_model_len: int = MAX_MODEL_LEN,
) -> Any:
    """Runner, scheduler and engine core, warmed up (CUDA graphs captured).

    `model` None loads the bundled model; otherwise the runner serves it as is.
    """
    from backend.config import CacheConfig, ModelConfig, SchedulerConfig
    from backend.engine.core import EngineCore
    from backend.executor.model_runner import ModelRunner
    from backend.kv_cache.manager import KVCacheManager
    from backend.scheduler.scheduler import Scheduler

    scheduler_config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=MAX_BATCHED_TOKENS,
        max_waiting=4 * IN_FLIGHT,
        max_model_len=max_model_len,
    )
    cache_config = CacheConfig(num_blocks=num_blocks, cache_bytes=kv_bytes or 2**30)
    runner = ModelRunner(
        ModelConfig(device=device, dtype=dtype, cuda_graphs=cuda_graphs),  # type: ignore[arg-type]
        cache_config,
        scheduler_config,
        model=model,
    )
    kv = KVCacheManager(runner.num_blocks, runner.block_size, enable_prefix_caching=False)
    core = EngineCore(Scheduler(scheduler_config, kv), runner)
    runner.warmup()
    return core


def free_kv_bytes() -> int:
    """GPU memory the KV pool may take now: what is free, minus a reserve."""
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    return int(max(free - KV_RESERVE_BYTES, 2**30))


def bytes_per_decode_step(model: Any) -> int:
    """Weight bytes one decode step reads: all of them but the embedding table (one row)."""
    state = model.state_dict()
    total = sum(t.numel() * t.element_size() for t in state.values())
    embedding = state["tok_embeddings.weight"]
    output = state.get("output.weight")
    tied = output is not None and output.data_ptr() == embedding.data_ptr()
    return int(total if tied else total - embedding.numel() * embedding.element_size())


# -- the parts ------------------------------------------------------------------------------


def kernel_checks(results: Results, quick: bool) -> None:
    """The self-check's kernels against their references."""
    import torch

    from backend.executor.kernels.selfcheck import check_kernels

    checks = check_kernels(torch.device("cuda"), quick=quick)
    failed = [c for c in checks if not c.ok]
    worst = max(checks, key=lambda c: c.relative_error / c.tolerance)
    if failed:
        notes = "failed: " + "; ".join(f"{c.name} {c.relative_error:.1e}" for c in failed)
    else:
        notes = f"worst: {worst.name}, {worst.relative_error:.1e} (tolerance {worst.tolerance:.0e})"
    row = Row(
        "kernels vs references", "-", f"{len(checks) - len(failed)}/{len(checks)} ok", "", notes
    )
    (results.fail if failed else results.add)(row)


def copy_bandwidth(results: Results, quick: bool) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    import torch

    size = (2 if quick else 4) * 2**30
    src = torch.empty(size, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 10
    start.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1000 / reps
    bandwidth = 2 * size / seconds
    results.add(
        Row(
            "device-to-device copy",
            "-",
            bandwidth / 1e9,
            "GB/s",
            f"{size // 2**30} GiB copied; bytes read + written",
        )
    )
    return bandwidth


def bundled_generate(device: str, dtype: str) -> list[list[int]]:
    """Greedy completions of the chat prompts by the bundled model on one device."""
    core = build_engine(None, 8, num_blocks=512, device=device, dtype=dtype, max_model_len=1024)
    tokenizer = core.executor.tokenizer
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in BUNDLED_PROMPTS
    ]
    run = drive(core, [Work(p, BUNDLED_NEW_TOKENS) for p in prompts], len(prompts))
    return run.token_ids


def bundled_agreement(results: Results) -> None:
    """Greedy tokens of the bundled model: GPU float32 and bfloat16 against the CPU engine."""
    from backend.models.loader import resolve_model_dir

    try:
        resolve_model_dir(None)
    except (FileNotFoundError, ImportError) as exc:
        # Not a failure of the engine: the weights (or the GGUF reader) are not installed.
        results.add(Row("bundled SmolLM2-135M", "-", "skipped", "", str(exc)[:200]))
        return

    cpu = bundled_generate("cpu", "float32")
    gpu32 = bundled_generate("cuda", "float32")
    identical = sum(a == b for a, b in zip(cpu, gpu32, strict=True))
    row = Row(
        "bundled SmolLM2-135M greedy, GPU vs CPU engine",
        "fp32",
        f"{identical}/{len(cpu)} identical",
        "prompts",
        f"{BUNDLED_NEW_TOKENS} tokens each; must all be identical",
    )
    (results.add if identical == len(cpu) else results.fail)(row)
    gpu16 = bundled_generate("cuda", "bfloat16")
    same = sum(a == b for a, b in zip(cpu, gpu16, strict=True))
    prefix = [_common_prefix(a, b) / max(len(a), 1) for a, b in zip(cpu, gpu16, strict=True)]
    results.add(
        Row(
            "bundled SmolLM2-135M greedy, GPU vs CPU fp32",
            "bf16",
            f"{same}/{len(cpu)} identical",
            "prompts",
            f"mean matching prefix {sum(prefix) / len(prefix):.0%} (bf16 may diverge)",
        )
    )


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def batch_one_decode(
    results: Results, model: Any, fmt: str, bandwidth: float, graphs: bool = True
) -> None:
    """Batch-1 decode tokens/s after a 128-token prompt, and the bandwidth floor's fraction."""
    blocks = math.ceil((BATCH_ONE_PROMPT + BATCH_ONE_OUTPUT) / 16) + 8
    core = build_engine(model, 1, num_blocks=blocks, cuda_graphs=graphs)
    works = workload(2, BATCH_ONE_PROMPT, BATCH_ONE_OUTPUT, model.config.vocab_size)
    drive(core, works[:1], 1)  # warm-up
    run = drive(core, works[1:], 1)
    times = run.token_times[0]
    tok_s = (len(times) - 1) / (times[-1] - times[0])
    step_bytes = bytes_per_decode_step(model)
    floor_tok_s = bandwidth / step_bytes
    label = "batch-1 decode" + ("" if graphs else ", no CUDA graphs")
    results.add(
        Row(
            label,
            fmt,
            tok_s,
            "tok/s",
            f"{tok_s / floor_tok_s:.0%} of the bandwidth floor ({floor_tok_s:,.0f} tok/s: "
            f"{step_bytes / 1e9:.2f} GB per step)",
        )
    )
    del core


def throughput(
    results: Results, core: Any, fmt: str, prompt_len: int, output_len: int, count: int, vocab: int
) -> None:
    """Output tokens/s with `IN_FLIGHT` requests in flight."""
    run = drive(core, workload(count, prompt_len, output_len, vocab, seed=prompt_len), IN_FLIGHT)
    results.add(
        Row(
            f"engine {prompt_len}/{output_len}, {IN_FLIGHT} in flight",
            fmt,
            run.tok_s,
            "output tok/s",
            f"{count} requests; peak running {run.peak_running}; "
            f"preemptions {run.preemptions}; TTFT p50 {percentile(run.ttft_s, 50) * 1e3:,.0f} ms",
        )
    )


def ttft(results: Results, core: Any, fmt: str, count: int, vocab: int) -> None:
    """Time to first token at `TTFT_CONCURRENCY` in flight."""
    works = workload(count, TTFT_PROMPT, TTFT_OUTPUT, vocab, seed=7)
    run = drive(core, works, TTFT_CONCURRENCY)
    p50, p99 = percentile(run.ttft_s, 50) * 1e3, percentile(run.ttft_s, 99) * 1e3
    results.add(
        Row(
            f"TTFT p50 / p99, {TTFT_CONCURRENCY} in flight",
            fmt,
            f"{p50:,.0f} / {p99:,.0f}",
            "ms",
            f"{count} requests of {TTFT_PROMPT}/{TTFT_OUTPUT}; {run.tok_s:,.0f} output tok/s",
        )
    )


def hf_generate(results: Results, model: Any, prompt_len: int, output_len: int, batch: int) -> None:
    """Hugging Face `generate` on one static batch of the same weights."""
    import torch

    from backend.models.hf_export import build_hf_model

    hf = build_hf_model(model)
    vocab = model.config.vocab_size
    works = workload(batch, prompt_len, output_len, vocab, seed=prompt_len)
    ids = torch.tensor([w.prompt for w in works], device=model.tok_embeddings.weight.device)
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    kwargs = dict(
        attention_mask=torch.ones_like(ids),
        max_new_tokens=output_len,
        min_new_tokens=output_len,
        do_sample=False,
        pad_token_id=0,
    )
    with torch.inference_mode():
        hf.generate(
            ids[:2],
            **{
                **kwargs,
                "attention_mask": torch.ones_like(ids[:2]),
                "max_new_tokens": 4,
                "min_new_tokens": 4,
            },
        )
        sync()
        start = time.perf_counter()
        out = hf.generate(ids, **kwargs)
        sync()
    wall = time.perf_counter() - start
    generated = (out.shape[1] - prompt_len) * batch
    results.add(
        Row(
            f"HF generate {prompt_len}/{output_len}, static batch {batch}",
            "bf16",
            generated / wall,
            "output tok/s",
            f"one batch, {wall:.1f} s",
        )
    )
    del hf, out


def synthetic_8b(results: Results, fmt: str, bandwidth: float, quick: bool) -> None:
    """Every measurement of one weight format on the synthetic 8B model."""
    import torch

    from backend.models.synthetic import build_synthetic_model, llama_3_1_8b_config

    config = llama_3_1_8b_config()
    quant = {"bf16": "none", "fp8": "fp8", "int4": "int4"}[fmt]
    started = time.perf_counter()
    model = build_synthetic_model(
        config, torch.bfloat16, "cuda", quant=quant, max_positions=MAX_MODEL_LEN, seed=SEED
    )
    torch.cuda.synchronize()
    print(f"built the 8B model in {fmt} in {time.perf_counter() - started:.1f} s", flush=True)
    vocab = config.vocab_size
    results.guard("batch-1 decode", fmt, lambda: batch_one_decode(results, model, fmt, bandwidth))
    if fmt == "bf16":
        results.guard(
            "batch-1 decode, no CUDA graphs",
            fmt,
            lambda: batch_one_decode(results, model, fmt, bandwidth, graphs=False),
        )
    if fmt == "int4":
        return
    holder: dict[str, Any] = {}

    def engine() -> None:
        holder["core"] = build_engine(model, IN_FLIGHT, kv_bytes=free_kv_bytes())
        runner = holder["core"].executor
        print(f"KV pool: {runner.num_blocks} blocks of 16 tokens", flush=True)

    results.guard(f"engine, {IN_FLIGHT} in flight", fmt, engine)
    if "core" in holder:
        core = holder["core"]
        short = 2 * IN_FLIGHT if not quick else IN_FLIGHT
        results.guard(
            "engine 128/128", fmt, lambda: throughput(results, core, fmt, 128, 128, short, vocab)
        )
        results.guard(
            "engine 1000/1000",
            fmt,
            lambda: throughput(results, core, fmt, 1000, 1000, IN_FLIGHT, vocab),
        )
        results.guard("TTFT", fmt, lambda: ttft(results, core, fmt, 64 if quick else 128, vocab))
        del core
        holder.clear()
        gc.collect()
        torch.cuda.empty_cache()
    if fmt == "bf16":
        results.guard(
            "HF generate 128/128", fmt, lambda: hf_generate(results, model, 128, 128, IN_FLIGHT)
        )
        if not quick:
            results.guard(
                "HF generate 1000/1000",
                fmt,
                lambda: hf_generate(results, model, 1000, 1000, HF_LONG_BATCH),
            )


# -- the run --------------------------------------------------------------------------------


def environment_line() -> str:
    """GPU, driver-visible memory and library versions."""
    import torch

    from backend.executor.kernels import triton_available, triton_kernels_supported

    props = torch.cuda.get_device_properties(0)
    parts = [
        f"{props.name} ({props.total_memory / 2**30:.0f} GiB, compute capability "
        f"{props.major}.{props.minor})",
        f"torch {torch.__version__}",
    ]
    if triton_available():
        import triton

        parts.append(f"triton {triton.__version__}")
    if not triton_kernels_supported(torch.device("cuda")):
        parts.append("Triton kernels off here (paged kernel, int4 kernel and CUDA graphs)")
    try:
        import transformers

        parts.append(f"transformers {transformers.__version__}")
    except ImportError:
        parts.append("no transformers")
    return "; ".join(parts)


def report(results: Results, env: str, quick: bool, write: bool) -> None:
    """Print the table last; write it into docs/benchmarks.md."""
    rows = [*results.rows]
    rows.append(
        Row(
            "TensorRT-LLM, published (anchor)",
            "fp8",
            TRTLLM_ANCHOR_TOK_S,
            "output tok/s",
            "Llama-3.1-8B-FP8, 128/128, one H100; NVIDIA's figure, not measured here",
        )
    )
    table = markdown_table(
        ["measurement", "format", "result", "unit", "notes"], [r.cells() for r in rows]
    )
    print()
    print(table)
    if not write:
        return
    write_section(
        "gpu",
        f"""## Torch engine on one GPU (`bench/gpu.py{" --quick" if quick else ""}`)

{machine_line()}. {env}.

The 8B rows run Llama-3.1-8B's architecture with random weights built on the
GPU (bf16; FP8 = e4m3 weights and per-token e4m3 activations through
`torch._scaled_mm`; INT4 = group-wise weight-only through the Triton kernel),
greedy to the full output length, through the engine in-process (no HTTP).
The bandwidth floor of batch-1 decode is the bytes of weights one step reads
divided by the measured copy bandwidth. HF `generate` runs one static batch
of the same bf16 weights. The TensorRT-LLM row is NVIDIA's published figure,
shown as an anchor only.

{table}
""",
    )


def main() -> int:
    """Run every part; exit 0 when every check passed, 1 when one failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests, skip HF 1000/1000")
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    parser.add_argument("--skip-bundled", action="store_true", help="skip the SmolLM2 checks")
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("bench/gpu.py needs torch with CUDA; torch is not installed", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(
            "bench/gpu.py needs a CUDA GPU, and torch sees none "
            f"(torch {torch.__version__}); nothing was measured",
            file=sys.stderr,
        )
        return 2
    torch.manual_seed(SEED)
    env = environment_line()
    print(env, flush=True)
    results = Results()
    results.guard("kernels vs references", "-", lambda: kernel_checks(results, args.quick))
    bandwidth_box: list[float] = []
    results.guard(
        "device-to-device copy",
        "-",
        lambda: bandwidth_box.append(copy_bandwidth(results, args.quick)),
    )
    bandwidth = bandwidth_box[0] if bandwidth_box else float("nan")
    if not args.skip_bundled:
        results.guard("bundled SmolLM2-135M", "fp32", lambda: bundled_agreement(results))
    for fmt in ("bf16", "fp8", "int4"):
        results.guard(
            f"synthetic Llama-3.1-8B ({fmt})",
            fmt,
            lambda fmt=fmt: synthetic_8b(results, fmt, bandwidth, args.quick),
        )
    report(results, env, args.quick, not args.no_write)
    return 1 if results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
