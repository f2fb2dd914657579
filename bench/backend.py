"""The bundled backend against Hugging Face `generate`, side by side in one run.

    python bench/backend.py                 # thread sweep, then the full table
    python bench/backend.py --threads 2     # skip the sweep
    python bench/backend.py --soak 600      # RSS under 10 minutes of load
    python bench/backend.py --soak 600 --fast   # the same, serving with FAST
    python bench/backend.py --c1            # concurrency 1 only, set-ups in C1_SETUPS

One workload (seeded; prompts of 32-512 random tokens, outputs of 16-256
tokens, generated to their full length) is served by:

- Hugging Face `generate`, one request at a time;
- Hugging Face `generate`, static left-padded batches of 8 and 32;
- Tollgate's backend over HTTP (streaming completions) at concurrency 1, 8, 32.

Each Hugging Face scenario runs in a child process of this script so its peak
RSS is its own; the backend is a child too. Both run the same weights in the
same dtype: `generate` the GGUF file dequantized, the backend by default
(`--quant auto`) the file's own Q4_1 values as int4, which are exactly the
same numbers (`UNQUANTIZED` rows run the dequantized copy). Throughput counts
only the tokens each request asked for: a padded batch that keeps decoding for
its longest member does not get credit for the padding. Time to first token
for a static batch is measured from the batch's start, which favours
`generate` (a real server would add the wait for the batch in front).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from common import (  # type: ignore[import-not-found]
    REPO,
    RssSampler,
    machine_line,
    markdown_table,
    percentile,
    write_section,
)

SINGLE_REQUESTS = 12
WARMUP_MINUTES = 2
BATCH_REQUESTS = 64
FAST = ("--compile",)
"""Backend flags of the fastest CPU set-up measured: decode steps through
torch.compile (docs/backend.md, "Compiled decode")."""
UNQUANTIZED = ("--quant", "none")
"""The weights dequantized to the model dtype, as `generate` runs them. By
default (`--quant auto`) the backend serves the bundled Q4_1 file as int4,
which holds exactly the same values (tests/integration/backend/test_quant_auto.py)."""
SETUPS: tuple[tuple[str, ...], ...] = ((), FAST, UNQUANTIZED)
"""Backend flags of the main run's Tollgate rows; () is the defaults."""
C1_SETUPS: tuple[tuple[str, ...], ...] = ((), FAST)
"""What `--c1` measures at concurrency 1 against one-at-a-time `generate`."""
VOCAB_LOW, VOCAB_HIGH = 1000, 48000


@dataclass(frozen=True)
class Work:
    """One request of the workload."""

    prompt: list[int]
    max_tokens: int


@dataclass
class Sample:
    """What one request measured."""

    ttft_s: float
    itl_s: list[float]
    tokens: int


@dataclass
class Scenario:
    """One row of the table."""

    name: str
    wall_s: float
    samples: list[Sample]
    peak_rss_mib: float
    threads: int
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        """Useful output tokens over the scenario."""
        return sum(s.tokens for s in self.samples)

    @property
    def tok_s(self) -> float:
        """Output tokens per second of wall time."""
        return self.tokens / self.wall_s

    def row(self) -> list[object]:
        """The table row."""
        ttft = [s.ttft_s * 1000 for s in self.samples]
        itl = [g * 1000 for s in self.samples for g in s.itl_s]
        return [
            self.name,
            self.threads,
            len(self.samples),
            self.tokens,
            self.tok_s,
            percentile(ttft, 50),
            percentile(ttft, 99),
            percentile(itl, 50),
            percentile(itl, 99),
            self.peak_rss_mib,
        ]


HEADERS = [
    "scenario",
    "threads",
    "requests",
    "output tokens",
    "output tok/s",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "ITL p50 ms",
    "ITL p99 ms",
    "peak RSS MiB",
]


def workload(n: int, seed: int = 0) -> list[Work]:
    """`n` requests with prompts of 32-512 tokens and outputs of 16-256 tokens."""
    rng = random.Random(seed)
    return [
        Work(
            [rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(rng.randint(32, 512))],
            rng.randint(16, 256),
        )
        for _ in range(n)
    ]


# -- Hugging Face generate, in a child process ---------------------------------------------


def sweep_workload(n: int) -> list[Work]:
    """Short requests for choosing thread counts: 128-token prompts, 64 outputs."""
    return [Work(w.prompt[:128], 64) for w in workload(n, seed=7)]


def hf_worker(threads: int, dtype: str, batch: int, count: int, sweep: bool) -> dict[str, Any]:
    """Run `count` requests through `generate` in static batches of `batch`."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    from backend.executor.model_runner import resolve_dtype
    from backend.models.loader import resolve_model_dir

    torch.set_num_threads(threads)
    model_dir = resolve_model_dir(None)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=resolve_dtype(dtype, torch.device("cpu"))
    )
    model.eval()
    pad = int(model.config.eos_token_id or 0)

    class Clock(BaseStreamer):  # type: ignore[misc]
        def __init__(self) -> None:
            self.times: list[float] = []
            self.seen_prompt = False

        def put(self, value: Any) -> None:
            if self.seen_prompt:
                self.times.append(time.perf_counter())
            self.seen_prompt = True

        def end(self) -> None:
            pass

    def run(works: list[Work]) -> list[Sample]:
        longest = max(len(w.prompt) for w in works)
        ids = torch.full((len(works), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(works), longest), dtype=torch.long)
        for i, w in enumerate(works):
            ids[i, longest - len(w.prompt) :] = torch.tensor(w.prompt)
            mask[i, longest - len(w.prompt) :] = 1
        steps = max(w.max_tokens for w in works)
        clock = Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=steps,
                min_new_tokens=steps,
                do_sample=False,
                pad_token_id=pad,
                streamer=clock,
            )
        times = clock.times
        samples = []
        for w in works:
            mine = times[: w.max_tokens]
            gaps = [b - a for a, b in itertools.pairwise(mine)]
            samples.append(Sample(mine[0] - start, gaps, w.max_tokens))
        return samples

    run(workload(1, seed=99)[:1])  # warm-up: first-call allocations and kernel selection
    works = sweep_workload(count) if sweep else workload(count)
    samples: list[Sample] = []
    start = time.perf_counter()
    for i in range(0, count, batch):
        samples += run(works[i : i + batch])
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"wall_s": wall, "samples": [asdict(s) for s in samples], "peak_rss_mib": peak}


def run_hf(threads: int, dtype: str, batch: int, count: int, sweep: bool = False) -> Scenario:
    """Run `hf_worker` in a child process and read its result."""
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--hf-worker",
            f"--threads={threads}",
            f"--dtype={dtype}",
            f"--batch={batch}",
            f"--count={count}",
            *(["--sweep"] if sweep else []),
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    data = json.loads(out.stdout.strip().splitlines()[-1])
    name = "HF generate, one at a time" if batch == 1 else f"HF generate, static batch {batch}"
    return Scenario(
        name,
        data["wall_s"],
        [Sample(**s) for s in data["samples"]],
        data["peak_rss_mib"],
        threads,
    )


# -- Tollgate's backend over HTTP ----------------------------------------------------------


async def _one(client: Any, url: str, work: Work) -> Sample:
    body = {
        "model": "smollm2",
        "prompt": work.prompt,
        "max_tokens": work.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    times: list[float] = []
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = int(event["usage"]["completion_tokens"])
            if event.get("choices") and event["choices"][0].get("text"):
                times.append(time.perf_counter())
    if tokens != work.max_tokens:
        raise RuntimeError(f"asked for {work.max_tokens} tokens, got {tokens}")
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return Sample(times[0] - sent, gaps, tokens)


async def _drive(url: str, works: list[Work], concurrency: int) -> tuple[float, list[Sample]]:
    import httpx

    queue = list(reversed(works))
    samples: list[Sample] = []
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def worker() -> None:
            while queue:
                samples.append(await _one(client, url, queue.pop()))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start, samples


def setup_label(flags: tuple[str, ...]) -> str:
    """How a set-up's rows name it: " (--flag ...)", or nothing for the defaults."""
    return f" ({' '.join(flags)})" if flags else ""


class Backend:
    """Tollgate's backend as a child process with `threads` torch threads."""

    def __init__(self, threads: int, dtype: str, *extra: str) -> None:
        from tests.support.processes import BackendProcess

        self.threads = threads
        self.label = setup_label(extra)
        self.proc = BackendProcess("--threads", str(threads), "--dtype", dtype, *extra)

    def __enter__(self) -> Backend:
        self.proc.start()
        asyncio.run(_drive(self.proc.url, workload(2, seed=99), 2))  # warm-up
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.stop()

    def run(self, works: list[Work], concurrency: int) -> Scenario:
        """Serve `works` with `concurrency` clients; sample the backend's RSS."""
        assert self.proc.proc is not None
        with RssSampler(self.proc.proc.pid) as rss:
            wall, samples = asyncio.run(_drive(self.proc.url, works, concurrency))
        name = f"Tollgate backend{self.label}, concurrency {concurrency}"
        return Scenario(name, wall, samples, rss.peak_mib, self.threads)


# -- the runs -------------------------------------------------------------------------------


def sweep(dtype: str) -> tuple[int, int, str]:
    """Pick each system's torch thread count by measurement."""
    short = sweep_workload(8)
    rows = []
    hf_best = (0.0, 1)
    tg_best = (0.0, 1)
    for threads in (1, 2):
        hf = run_hf(threads, dtype, 1, 2, sweep=True)
        with Backend(threads, dtype) as backend:
            one = backend.run(short[:2], 1)
            eight = backend.run(short, 8)
        rows.append([threads, hf.tok_s, one.tok_s, eight.tok_s])
        hf_best = max(hf_best, (hf.tok_s, threads))
        tg_best = max(tg_best, (one.tok_s + eight.tok_s / 8, threads))
    table = markdown_table(
        ["threads", "HF generate tok/s", "Tollgate c1 tok/s", "Tollgate c8 tok/s"], rows
    )
    print(table, flush=True)
    return hf_best[1], tg_best[1], table


def _resolved(dtype: str) -> str:
    import torch

    from backend.executor.model_runner import resolve_dtype

    return str(resolve_dtype(dtype, torch.device("cpu"))).removeprefix("torch.")


def main_run(args: argparse.Namespace) -> None:
    """Thread choice, then every scenario, then the table and docs."""
    machine = machine_line()
    if args.threads:
        hf_threads = tg_threads = args.threads
        sweep_table = f"(thread count fixed at {args.threads} on the command line)"
    else:
        hf_threads, tg_threads, sweep_table = sweep(args.dtype)
    print(f"threads: HF {hf_threads}, Tollgate {tg_threads}", flush=True)
    works = workload(BATCH_REQUESTS)
    scenarios = [run_hf(hf_threads, args.dtype, 1, SINGLE_REQUESTS)]
    print(scenarios[-1].row(), flush=True)
    for batch in (8, 32):
        scenarios.append(run_hf(hf_threads, args.dtype, batch, BATCH_REQUESTS))
        print(scenarios[-1].row(), flush=True)
    for flags in SETUPS:
        with Backend(tg_threads, args.dtype, *flags) as backend:
            scenarios.append(backend.run(works[:SINGLE_REQUESTS], 1))
            print(scenarios[-1].row(), flush=True)
            for concurrency in (8, 32):
                scenarios.append(backend.run(works, concurrency))
                print(scenarios[-1].row(), flush=True)
    by_name = {s.name: s for s in scenarios}
    single = by_name["HF generate, one at a time"].tok_s
    static32 = by_name["HF generate, static batch 32"].tok_s
    rows = []
    for label in map(setup_label, SETUPS):
        c1 = by_name[f"Tollgate backend{label}, concurrency 1"].tok_s
        c32 = by_name[f"Tollgate backend{label}, concurrency 32"].tok_s
        rows += [
            [f"Tollgate{label} c32 / HF static batch 32", f"{c32 / static32:.2f}x", ">= 1.5x"],
            [f"Tollgate{label} c32 / HF one at a time", f"{c32 / single:.2f}x", ">= 6x"],
            [f"Tollgate{label} c1 / HF one at a time", f"{c1 / single:.2f}x", ">= 2x"],
        ]
    ratios = markdown_table(["ratio", "measured", "target"], rows)
    table = markdown_table(HEADERS, [s.row() for s in scenarios])
    print(table)
    print(ratios)
    write_section(
        "backend",
        f"""## Bundled backend vs Hugging Face `generate` (`bench/backend.py`)

{machine}. Model: the bundled SmolLM2-135M, dtype {_resolved(args.dtype)}. Tollgate rows
without flags run the defaults, which serve the file's own Q4_1 weights as
int4 where the model runs in bfloat16 (`--quant auto`); `--quant none` rows
run the dequantized weights, as `generate` does. Workload: seeded
random prompts of 32-512 tokens, outputs of 16-256 tokens generated to full
length (greedy, `ignore_eos`); {SINGLE_REQUESTS} requests for the one-at-a-time
rows, the same first {BATCH_REQUESTS} for the batched rows. Throughput counts
only the tokens requests asked for. TTFT of a static batch is measured from
the batch's start (no queueing counted), which favours `generate`.

Thread count per system, chosen by measurement (short runs, tokens/s):

{sweep_table}

{table}

{ratios}
""",
    )


def c1_run(args: argparse.Namespace) -> None:
    """One-at-a-time `generate` and the backend at concurrency 1, side by side."""
    threads = args.threads or 2
    machine = machine_line()
    works = workload(BATCH_REQUESTS)[:SINGLE_REQUESTS]
    hf = run_hf(threads, args.dtype, 1, SINGLE_REQUESTS)
    print(hf.row(), flush=True)
    scenarios, rows = [hf], []
    for flags in C1_SETUPS:
        with Backend(threads, args.dtype, *flags) as backend:
            scenarios.append(backend.run(works, 1))
        print(scenarios[-1].row(), flush=True)
        label = setup_label(flags)
        rows.append(
            [
                f"Tollgate{label} c1 / HF one at a time",
                f"{scenarios[-1].tok_s / hf.tok_s:.2f}x",
                ">= 2x",
            ]
        )
    table = markdown_table(HEADERS, [s.row() for s in scenarios])
    ratios = markdown_table(["ratio", "measured", "target"], rows)
    print(table)
    print(ratios)
    write_section(
        "backend-c1",
        f"""## Concurrency 1 against `generate` (`bench/backend.py --c1`)

{machine}. The workload, dtype ({_resolved(args.dtype)}) and {threads} threads of the
main run above, its first {SINGLE_REQUESTS} requests one at a time.

{table}

{ratios}
""",
    )


def soak(args: argparse.Namespace) -> None:
    """Concurrency-32 load for `args.soak` seconds; RSS sampled throughout."""
    threads = args.threads or 2
    works = workload(32, seed=3)
    machine = machine_line()
    flags = FAST if args.fast else ()
    with Backend(threads, args.dtype, *flags) as backend:
        assert backend.proc.proc is not None
        pid = backend.proc.proc.pid
        with RssSampler(pid, interval_s=1.0) as rss:
            start = time.monotonic()
            served = 0
            while time.monotonic() - start < args.soak:
                _, samples = asyncio.run(_drive(backend.proc.url, works, 32))
                served += len(samples)
        t0 = rss.samples[0][0]
        minutes: dict[int, list[float]] = {}
        for t, mib in rss.samples:
            minutes.setdefault(int((t - t0) // 60), []).append(mib)
    rows = [[m + 1, min(v), max(v)] for m, v in sorted(minutes.items())]
    fast = " --fast" if args.fast else ""
    # The allocator settles while every batch shape runs once; compare the
    # end with the end of the warm-up.
    warm = minutes[min(WARMUP_MINUTES, max(minutes)) - 1] if max(minutes) else minutes[0]
    first, last = max(warm), max(minutes[max(minutes)])
    # The second half shows whether growth stopped, however long the first
    # pass over the pool took.
    half = max(minutes[max(minutes) // 2])
    table = markdown_table(["minute", "RSS min MiB", "RSS max MiB"], rows)
    print(table)
    summary = (
        f"{served} requests at concurrency 32 over {(rss.samples[-1][0] - t0) / 60:.0f} min; "
        f"peak RSS in minute {WARMUP_MINUTES} {first:.0f} MiB, in the last minute "
        f"{last:.0f} MiB ({(last - first) / first * 100:+.1f}%); over the second half, "
        f"minute {max(minutes) // 2 + 1} to the last, {(last - half) / half * 100:+.1f}%."
    )
    print(summary)
    write_section(
        "backend-soak-fast" if args.fast else "backend-soak",
        f"""## Backend RSS under sustained load (`bench/backend.py --soak {args.soak}{fast}`)

{machine}. Backend flags: {" ".join(flags) or "none (defaults)"}. {summary}
The KV pool is reserved up front and its pages are mapped as blocks first
fill, so memory grows until the allocator has cycled through the pool and
every code path has run once, then stays flat.

{table}
""",
    )


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="skip the sweep, use this many")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--soak", type=int, default=0, help="seconds of sustained load")
    parser.add_argument("--fast", action="store_true", help="soak the fastest set-up (FAST)")
    parser.add_argument(
        "--c1", action="store_true", help="only concurrency 1 against one-at-a-time generate"
    )
    parser.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--sweep", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_worker:
        print(json.dumps(hf_worker(args.threads, args.dtype, args.batch, args.count, args.sweep)))
    elif args.soak:
        soak(args)
    elif args.c1:
        c1_run(args)
    else:
        main_run(args)


if __name__ == "__main__":
    main()
