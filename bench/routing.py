"""Routing over three replicas: token-aware balancing against round robin, and
prefix affinity against none, each pair side by side in one run.

    python bench/routing.py                          # both parts, writes docs/benchmarks.md
    python bench/routing.py --part balance --seconds 5 --no-write   # a quick look

Balancing (``--part balance``): three fake replicas
(tests/support/fake_upstream.py) that simulate a continuous-batching
decoder: every running request gets one token per step, and a step takes
``STEP_MS + STEP_PER_SEQ_MS * running`` ms, so a replica holding more work
answers every request on it more slowly, as a real engine does. Their
``/stats`` report the tokens still to generate, as the built-in backend's do.
Closed-loop clients send a mix of short (16 tokens) and long (256 tokens)
non-streamed generations, 1 in 5 long, with ``max_tokens`` set to the
length, through one gateway process whose pool uses ``round_robin`` or
``least_load`` (no affinity in either). Simulated replicas make the
comparison about the balancer alone and let it run at a concurrency that
three real CPU backends on this machine could not sustain; the model of
the engine is an assumption, stated here.

Prefix affinity (``--part affinity``): three real backends (the bundled
model, one CPU thread and a 64 MiB KV cache each). Requests carry one of
eight long system prompts (about 260 tokens each) and a short question,
``max_tokens`` 1, so a request's latency is its time to the first token.
Without affinity, least load spreads every prompt over every replica, and
eight prompts do not fit in one replica's cache; with prefix affinity each
prompt has a home replica. Each variant uses its own prompts, so neither
inherits the other's cached prefixes. Figures: time to first token and the
share of prompt tokens served from the backends' prefix caches
(``usage.prompt_tokens_details.cached_tokens``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from common import (  # type: ignore[import-not-found]
    REPO,
    machine_line,
    markdown_table,
    percentile,
    write_section,
)
from httpload import build_request, run  # type: ignore[import-not-found]

from tests.support.processes import BackendProcess, FakeUpstreamProcess, GatewayProcess

SECRET = "tollgate-bench-secret-0123456789-abcdefghijklmnop"
TENANT = "bench"
STEP_MS = 4.0
STEP_PER_SEQ_MS = 1.0
SHORT, LONG, LONG_SHARE = 16, 256, 0.2
BACKEND_ARGS = (
    "--max-model-len",
    "1024",
    "--threads",
    "1",
    "--kv-cache-bytes",
    str(64 * 2**20),
    "--max-num-seqs",
    "8",
)


def policy_dirs(work: Path, urls: list[str], balancer: dict[str, Any]) -> tuple[Path, Path]:
    """The shipped policies with one pool of `urls` under `balancer`, and a
    bench tenant whose limits never bind."""
    tenants, policies = work / "tenants", work / "policies"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(REPO / "tenants", tenants)
    shutil.copytree(REPO / "policies", policies)
    models = yaml.safe_load((policies / "models.yaml").read_text())
    pool = models["pools"]["local"]
    pool["replicas"] = [{"url": url, "weight": 1, "max_in_flight": 64} for url in urls]
    pool["balancer"] = balancer
    pool["health"] = {"probe_interval_s": 1, "load_interval_s": 0.25}
    pool["timeouts"] = {"connect_s": 2, "first_byte_s": 300, "between_chunks_s": 60, "total_s": 600}
    (policies / "models.yaml").write_text(yaml.safe_dump(models))
    big = 10**12
    tenant = {
        "id": TENANT,
        "display_name": "Benchmark",
        "tier": "enterprise",
        "allowed_models": ["*"],
        "default_priority": "interactive",
        "allowed_priorities": ["interactive"],
        "limits": {"requests_per_minute": big, "tokens_per_minute": big},
    }
    (tenants / "bench.yaml").write_text(yaml.safe_dump(tenant))
    return tenants, policies


def start_gateway(tenants: Path, policies: Path) -> GatewayProcess:
    env = {
        "TOLLGATE_TENANTS_DIR": str(tenants),
        "TOLLGATE_POLICIES_DIR": str(policies),
        "TOLLGATE_JWT_HS_SECRET": SECRET,
        "TOLLGATE_LOG_LEVEL": "warning",
    }
    gateway = GatewayProcess(env)
    gateway.start(timeout_s=60)
    return gateway


@dataclass(frozen=True)
class Reply:
    """One request as the client saw it."""

    kind: str
    status: int
    seconds: float
    body: bytes


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes, kind: str
) -> Reply:
    """Send one request on a keep-alive connection; read a Content-Length body."""
    start = time.perf_counter()
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    body = await reader.readexactly(length) if length else b""
    return Reply(kind, status, time.perf_counter() - start, body)


async def closed_loop(
    port: int, pick: Any, concurrency: int, seconds: float, warmup_s: float
) -> tuple[list[Reply], float]:
    """`concurrency` connections sending `pick(rng) -> (kind, raw)` back to back."""
    replies: list[Reply] = []
    begin = time.perf_counter()
    measure_from = begin + warmup_s
    stop_at = measure_from + seconds

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**20)
        try:
            while time.perf_counter() < stop_at:
                sent = time.perf_counter()
                kind, raw = pick(rng)
                reply = await exchange(reader, writer, raw, kind)
                if sent >= measure_from:
                    replies.append(reply)
        finally:
            writer.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return replies, stop_at - measure_from


def chat(messages: list[dict[str, str]], max_tokens: int, **extra: Any) -> bytes:
    body = {"model": "smollm2", "messages": messages, "max_tokens": max_tokens, **extra}
    return json.dumps(body).encode()


# --- token-aware balancing against round robin ------------------------------------


def balance(args: argparse.Namespace, token: str, work: Path) -> str:
    auth = {"authorization": f"Bearer {token}"}
    requests = {
        kind: build_request(
            "/v1/chat/completions",
            chat(
                [{"role": "user", "content": f"Tell me something ({kind})."}],
                tokens,
                x_fake={"completion_tokens": tokens},
            ),
            auth,
        )
        for kind, tokens in (("short", SHORT), ("long", LONG))
    }

    def pick(rng: random.Random) -> tuple[str, bytes]:
        kind = "long" if rng.random() < LONG_SHARE else "short"
        return kind, requests[kind]

    fakes = [
        FakeUpstreamProcess("--step-ms", str(STEP_MS), "--step-per-seq-ms", str(STEP_PER_SEQ_MS))
        for _ in range(3)
    ]
    rows: list[list[object]] = []
    try:
        for fake in fakes:
            fake.start(timeout_s=60)
        for strategy in ("round_robin", "least_load"):
            balancer = {"strategy": strategy, "affinity": "none"}
            tenants, policies = policy_dirs(work / strategy, [f.url for f in fakes], balancer)
            gateway = start_gateway(tenants, policies)
            try:
                replies, measured = run(
                    closed_loop(gateway.port, pick, args.concurrency, args.seconds, args.warmup)
                )
            finally:
                gateway.stop()
            bad = [r.status for r in replies if r.status != 200]
            if bad:
                raise RuntimeError(f"{strategy}: {len(bad)} failed, statuses {sorted(set(bad))}")
            every = [r.seconds * 1000 for r in replies]
            short = [r.seconds * 1000 for r in replies if r.kind == "short"]
            long = [r.seconds * 1000 for r in replies if r.kind == "long"]
            tokens = sum(LONG if r.kind == "long" else SHORT for r in replies)
            row: list[object] = [
                strategy,
                len(replies),
                percentile(every, 50),
                percentile(every, 99),
                percentile(short, 50),
                percentile(short, 99),
                percentile(long, 50),
                percentile(long, 99),
                len(replies) / measured,
                tokens / measured,
            ]
            rows.append(row)
            print(row, flush=True)
    finally:
        for fake in fakes:
            fake.stop()
    table = markdown_table(
        [
            "balancer",
            "requests",
            "p50 ms",
            "p99 ms",
            "short p50 ms",
            "short p99 ms",
            "long p50 ms",
            "long p99 ms",
            "req/s",
            "tokens/s",
        ],
        rows,
    )
    return f"""### Token-aware balancing against round robin

Three simulated replicas (a decode step of {STEP_MS:g} ms + {STEP_PER_SEQ_MS:g} ms
per running request), {args.concurrency} closed-loop clients for {args.seconds:g} s
after {args.warmup:g} s of warm-up; {int(LONG_SHARE * 100)}% of requests generate
{LONG} tokens, the rest {SHORT}. Latency is the whole non-streamed request.

{table}
"""


# --- prefix affinity against none --------------------------------------------------

_TOPICS = (
    "hiking boots",
    "espresso machines",
    "garden tools",
    "bicycle repairs",
    "winter tyres",
    "camping stoves",
    "kitchen knives",
    "running shoes",
)


def system_prompt(variant: str, topic: str) -> str:
    """A long support-bot system prompt, different per variant from its first words."""
    return (
        f"[{variant}] You are the support assistant of a shop that sells {topic}. "
        "Answer politely and briefly. Unused items may be returned within 60 days with a "
        "receipt; sale items are final. Shipping is free above 50 euros, otherwise 4.90 euros "
        "within the EU. Orders placed before 2 pm ship the same day. Repairs take two to three "
        "weeks. Loyalty members collect one point per euro and get a 10 euro voucher per 200 "
        "points. Never promise delivery dates for items that are out of stock. If a customer "
        "is angry, apologise once, then focus on a concrete next step. "
    ) * 2


def affinity(args: argparse.Namespace, token: str, work: Path) -> str:
    auth = {"authorization": f"Bearer {token}"}
    backends = [BackendProcess(*BACKEND_ARGS) for _ in range(3)]
    rows: list[list[object]] = []
    try:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda b: b.start(timeout_s=900), backends))
        for mode in ("none", "prefix"):
            prompts = [system_prompt(mode, topic) for topic in _TOPICS]

            def pick(rng: random.Random, prompts: list[str] = prompts) -> tuple[str, bytes]:
                messages = [
                    {"role": "system", "content": rng.choice(prompts)},
                    {"role": "user", "content": f"Question {rng.randrange(10**6)}: returns?"},
                ]
                raw = build_request("/v1/chat/completions", chat(messages, 1), auth)
                return "q", raw

            balancer = {"strategy": "least_load", "affinity": mode}
            tenants, policies = policy_dirs(work / mode, [b.url for b in backends], balancer)
            gateway = start_gateway(tenants, policies)
            try:
                replies, measured = run(
                    closed_loop(
                        gateway.port, pick, args.affinity_concurrency, args.affinity_seconds, 0
                    )
                )
            finally:
                gateway.stop()
            bad = [r.status for r in replies if r.status != 200]
            if bad:
                raise RuntimeError(f"{mode}: {len(bad)} failed, statuses {sorted(set(bad))}")
            prompt = cached = 0
            for reply in replies:
                usage = json.loads(reply.body)["usage"]
                prompt += usage["prompt_tokens"]
                cached += usage["prompt_tokens_details"]["cached_tokens"]
            ttft = [r.seconds * 1000 for r in replies]
            row: list[object] = [
                "prefix affinity" if mode == "prefix" else "none (least load)",
                len(replies),
                percentile(ttft, 50),
                percentile(ttft, 99),
                f"{cached / max(1, prompt):.0%}",
                len(replies) / measured,
            ]
            rows.append(row)
            print(row, flush=True)
    finally:
        for backend in backends:
            backend.stop()
    table = markdown_table(
        ["affinity", "requests", "TTFT p50 ms", "TTFT p99 ms", "cached prompt tokens", "req/s"],
        rows,
    )
    return f"""### Prefix affinity against none

Three real backends (bundled model, 1 CPU thread, 64 MiB KV cache each) on a
machine with {args.cpus} CPUs shared by all three and the gateway;
{args.affinity_concurrency} closed-loop clients for {args.affinity_seconds:g} s per
variant; eight system prompts of about 260 tokens, a short question,
`max_tokens` 1 (so the request time is the time to the first token).

{table}
"""


def main() -> None:
    """Run the parts asked for and write (or print) the section."""
    import os

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["balance", "affinity", "both"], default="both")
    parser.add_argument("--seconds", type=float, default=30.0, help="balancing window per variant")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--affinity-seconds", type=float, default=60.0)
    parser.add_argument("--affinity-concurrency", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print, leave the docs alone")
    args = parser.parse_args()
    args.cpus = os.cpu_count()

    from gateway.auth.minting import mint_token
    from gateway.auth.settings import AuthSettings

    machine = machine_line()
    token = mint_token(AuthSettings(hs_secret=SECRET), tenant=TENANT, app="bench")
    work = Path(tempfile.mkdtemp(prefix="tollgate-bench-routing-"))
    parts = []
    try:
        if args.part in ("balance", "both"):
            parts.append(balance(args, token, work))
        if args.part in ("affinity", "both"):
            parts.append(affinity(args, token, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    section = (
        "## Routing (bench/routing.py)\n\n"
        f"Measured {machine}.\n\n" + "\n".join(parts) + "\nSee docs/routing.md for the method.\n"
    )
    print(section)
    if not args.no_write:
        write_section("routing", section)


if __name__ == "__main__":
    main()
