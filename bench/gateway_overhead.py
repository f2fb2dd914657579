"""What the gateway adds: the same fake upstream called directly and through
one gateway process, side by side in one run.

    python bench/gateway_overhead.py                # full run, writes docs/benchmarks.md
    python bench/gateway_overhead.py --seconds 3    # shorter windows

The fake upstream (tests/support/fake_upstream.py) answers in microseconds and
runs in its own process; the load generator (bench/httpload.py) is this
process. The gateway runs as `tollgate gateway` with every stage on: JWT auth,
policy lookup, routing, the priority queue, quotas and the per-request log
line (written to a file, as in production). Each gateway variant (one per
quota store) is measured against a direct run taken right before it.

Figures: latency percentiles of whole requests (non-streaming) or of the
first body bytes (streaming), the difference between gateway and direct at
the same percentile ("added"), the gateway's own `x-tollgate-overhead-ms`
(auth to upstream send), requests per second, and the gateway's RSS while it
holds 1,000 concurrent streams.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from common import (  # type: ignore[import-not-found]
    REPO,
    RssSampler,
    machine_line,
    markdown_table,
    percentile,
    write_section,
)
from httpload import Result, build_request, closed_loop, hold_streams, run  # type: ignore[import-not-found]

from tests.support.processes import FakeUpstreamProcess, GatewayProcess, RedisServer

SECRET = "tollgate-bench-secret-0123456789-abcdefghijklmnop"
TENANT = "bench"
CONCURRENCY = (1, 16, 64)
HELD_STREAMS = 1000
UPSTREAM_DELAY_MS = 20
"""How long the fake takes to answer in the latency rows: a fast model call.
With an instant upstream a closed loop at concurrency 16 would saturate the
gateway and measure its queue, not its overhead; the throughput row uses
an instant upstream on purpose."""


@dataclass
class Window:
    """One closed-loop measurement."""

    results: list[Result]
    seconds: float

    def ok(self) -> list[Result]:
        """The results with status 200; a benchmark with failures is not a benchmark."""
        bad = [r.status for r in self.results if r.status != 200]
        if bad:
            raise RuntimeError(f"{len(bad)} requests failed, statuses {sorted(set(bad))}")
        return self.results

    def latency_ms(self, stream: bool) -> list[float]:
        """What we compare: first bytes for streams, the whole response otherwise."""
        return [(r.ttfb_s if stream else r.total_s) * 1000 for r in self.ok()]

    @property
    def rps(self) -> float:
        """Completed requests per second."""
        return len(self.results) / self.seconds


def policy_dirs(work: Path, upstream_url: str) -> tuple[Path, Path]:
    """The shipped policies plus a bench tenant whose limits never bind, and a
    pool wide enough that the priority queue never holds a request."""
    tenants, policies = work / "tenants", work / "policies"
    shutil.copytree(REPO / "tenants", tenants)
    shutil.copytree(REPO / "policies", policies)
    models = yaml.safe_load((policies / "models.yaml").read_text())
    for pool in models["pools"].values():
        for replica in pool["replicas"]:
            replica["url"] = upstream_url
            replica["max_in_flight"] = 4096
    (policies / "models.yaml").write_text(yaml.safe_dump(models))
    big = 10**12
    tenant = {
        "id": TENANT,
        "display_name": "Benchmark",
        "tier": "enterprise",
        "enabled": True,
        "allowed_models": ["*"],
        "default_priority": "interactive",
        "allowed_priorities": ["interactive", "standard", "batch"],
        "limits": {
            "requests_per_minute": big,
            "tokens_per_minute": big,
            "max_concurrent": 100_000,
            "tokens_per_day": big,
            "tokens_per_month": big,
            "max_output_tokens": 4096,
        },
        "on_store_failure": "fail_closed",
    }
    (tenants / "bench.yaml").write_text(yaml.safe_dump(tenant))
    return tenants, policies


@contextmanager
def gateway(env: dict[str, str]) -> Iterator[GatewayProcess]:
    """A gateway subprocess for the duration of a with-block."""
    proc = GatewayProcess(env)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def body(stream: bool, fake: dict[str, Any] | None = None) -> bytes:
    """A small chat request; 16 completion tokens from the fake."""
    payload: dict[str, Any] = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Say something short."}],
        "max_tokens": 16,
        "stream": stream,
    }
    if fake:
        payload["x_fake"] = fake
    return json.dumps(payload).encode()


def throughput(port: int, token: str, seconds: float) -> tuple[float, float]:
    """Non-streaming req/s at concurrency 64 with an instant upstream, and
    the gateway's median `x-tollgate-overhead-ms` at that load."""
    raw = build_request("/v1/chat/completions", body(False), {"authorization": f"Bearer {token}"})
    window = measure(port, raw, 64, seconds)
    window.ok()
    own = [r.overhead_ms for r in window.results if r.overhead_ms is not None]
    return window.rps, percentile(own, 50)


def measure(port: int, raw: bytes, concurrency: int, seconds: float) -> Window:
    """One closed-loop window."""
    results, measured = run(closed_loop(port, raw, concurrency, seconds))
    return Window(results, measured)


def held_streams_rss(gw: GatewayProcess, token: str) -> tuple[float, int]:
    """Peak gateway RSS (MiB) while `HELD_STREAMS` streams are open at once,
    and how many of them completed with status 200."""
    assert gw.proc is not None
    fake = {"chunk_interval_ms": 100, "completion_tokens": 60}
    raw = build_request(
        "/v1/chat/completions", body(True, fake), {"authorization": f"Bearer {token}"}
    )
    with RssSampler(gw.proc.pid, interval_s=0.2) as rss:
        results = run(hold_streams(gw.port, raw, HELD_STREAMS))
    ok = sum(1 for r in results if r.status == 200 and r.body_bytes > 0)
    return rss.peak_mib, ok


def main() -> None:
    """Run every variant and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per window")
    parser.add_argument(
        "--stores", default="memory,redis", help="quota stores to measure, comma-separated"
    )
    args = parser.parse_args()

    from gateway.auth.minting import mint_token
    from gateway.auth.settings import AuthSettings

    machine = machine_line()
    token = mint_token(AuthSettings(hs_secret=SECRET), tenant=TENANT, app="bench")
    auth = {"authorization": f"Bearer {token}"}
    work = Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
    fake = FakeUpstreamProcess()
    fake.start()
    redis = RedisServer()
    redis.start()
    rows: list[list[object]] = []
    held: list[list[object]] = []
    try:
        tenants, policies = policy_dirs(work, fake.url)
        base_env = {
            "TOLLGATE_TENANTS_DIR": str(tenants),
            "TOLLGATE_POLICIES_DIR": str(policies),
            "TOLLGATE_JWT_HS_SECRET": SECRET,
            "TOLLGATE_LOG_LEVEL": "info",
        }
        for store in args.stores.split(","):
            env = {**base_env, "TOLLGATE_STORE": store, "TOLLGATE_REDIS_URL": redis.url}
            with gateway(env) as gw:
                for stream in (False, True):
                    delayed = body(stream, {"delay_ms": UPSTREAM_DELAY_MS})
                    direct_raw = build_request("/v1/chat/completions", delayed)
                    via_raw = build_request("/v1/chat/completions", delayed, auth)
                    for concurrency in CONCURRENCY:
                        direct = measure(fake.port, direct_raw, concurrency, args.seconds)
                        via = measure(gw.port, via_raw, concurrency, args.seconds)
                        d, g = direct.latency_ms(stream), via.latency_ms(stream)
                        own = [r.overhead_ms for r in via.results if r.overhead_ms is not None]
                        row: list[object] = [
                            store,
                            "stream" if stream else "json",
                            concurrency,
                            percentile(d, 50),
                            percentile(g, 50),
                            percentile(g, 50) - percentile(d, 50),
                            percentile(d, 99),
                            percentile(g, 99),
                            percentile(g, 99) - percentile(d, 99),
                            percentile(own, 50),
                            direct.rps,
                            via.rps,
                        ]
                        rows.append(row)
                        print(row, flush=True)
                direct_rps = measure(
                    fake.port, build_request("/v1/chat/completions", body(False)), 64, args.seconds
                ).rps
                rps, own = throughput(gw.port, token, args.seconds)
                peak, ok = held_streams_rss(gw, token)
                held.append([store, direct_rps, rps, own, HELD_STREAMS, ok, peak])
                print(held[-1], flush=True)
    finally:
        redis.stop()
        fake.stop()
        shutil.rmtree(work, ignore_errors=True)

    table = markdown_table(
        [
            "store",
            "mode",
            "concurrency",
            "direct p50 ms",
            "gateway p50 ms",
            "added p50 ms",
            "direct p99 ms",
            "gateway p99 ms",
            "added p99 ms",
            "x-tollgate-overhead-ms p50",
            "direct req/s",
            "gateway req/s",
        ],
        rows,
    )
    held_table = markdown_table(
        [
            "store",
            "direct req/s (c64, instant upstream)",
            "gateway req/s (c64, instant upstream)",
            "x-tollgate-overhead-ms p50 at that load",
            "streams held at once",
            "completed ok",
            "gateway peak RSS MiB",
        ],
        held,
    )
    print(table)
    print(held_table)
    write_section(
        "gateway-overhead",
        f"""## Gateway overhead (`bench/gateway_overhead.py`)

{machine}. One gateway process (uvicorn, one worker) with JWT auth, policy
lookup, routing, the priority queue, quotas and the JSON log line on, in front
of the fake upstream in its own process; the load generator is a third
process. In the latency table the fake answers after {UPSTREAM_DELAY_MS} ms (a fast
model call), so concurrency 16 is a busy gateway rather than a saturated one;
"json" compares whole non-streaming responses, "stream" the first body bytes
of a 16-chunk stream. Each row's direct and gateway windows ran back to back
({args.seconds:.0f} s each, after 1 s of warm-up). The second table measures
throughput with an instant upstream, then holds {HELD_STREAMS} streams of 6 s
open at once. All three processes share 2 cores, so the gateway's req/s is a
lower bound.

Targets: added p50 at most 1 ms and p99 at most 5 ms at concurrency 1 and 16;
at least 1,500 non-streaming req/s; under 200 MB RSS holding 1,000 streams.

{table}

{held_table}
""",
    )


if __name__ == "__main__":
    main()
