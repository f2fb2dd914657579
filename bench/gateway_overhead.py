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
import asyncio
import contextlib
import json
import shutil
import statistics
import tempfile
import time
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

from tests.support.processes import FakeUpstreamProcess, GatewayProcess, RedisServer, ServiceProcess

SECRET = "tollgate-bench-secret-0123456789-abcdefghijklmnop"
TENANT = "bench"
CONCURRENCY = (1, 16, 64)
HELD_STREAMS = 1000
UPSTREAM_DELAY_MS = 20
"""How long the fake takes to answer in the latency rows: a fast model call.
With an instant upstream a closed loop at concurrency 16 would saturate the
gateway and measure its queue, not its overhead; the throughput row uses
an instant upstream on purpose."""
UPSTREAM_JITTER_MS = 10
"""Above concurrency 1 the fake's delay is uniform in 20 +/- 10 ms. With a
delay that never varies, a closed loop's clients fall into lock-step: two
requests that collide once stay one service time apart for ever, clusters
only grow, and soon all 16 arrive as one burst each round, so the figure
measured is the burst's queue on one event loop (1.3-2.3 ms json and
4.2-5.5 ms stream at concurrency 16, against 0.9-1.2 and 1.2-1.7 ms with the
jitter, in four side-by-side runs). Model calls never take the same time
twice. At concurrency 1 nothing can collide, and a fixed delay keeps the
comparison precise."""
STORE_COST_REPS = 5
"""Alternating memory/Redis windows per concurrency for the store's cost."""
FLOOR_REPS = 5
"""Alternating direct / bare proxy / gateway windows per row of the floor table."""


def upstream_delay(concurrency: int) -> dict[str, float]:
    """The fake's `x_fake` delay settings for a latency row."""
    if concurrency == 1:
        return {"delay_ms": UPSTREAM_DELAY_MS}
    return {"delay_ms": UPSTREAM_DELAY_MS, "delay_jitter_ms": UPSTREAM_JITTER_MS}


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


def throughput(gw: GatewayProcess, token: str, seconds: float) -> tuple[float, float, float]:
    """Non-streaming req/s at concurrency 64 with an instant upstream, the
    gateway's median `x-tollgate-overhead-ms` at that load, and the gateway
    process's CPU time per request (ms), which depends less on what else
    the machine runs than latency does."""
    import psutil

    assert gw.proc is not None
    raw = build_request("/v1/chat/completions", body(False), {"authorization": f"Bearer {token}"})
    proc = psutil.Process(gw.proc.pid)
    cpu_before = sum(proc.cpu_times()[:2])
    results, measured = run(closed_loop(gw.port, raw, 64, seconds, warmup_s=0.0))
    cpu = sum(proc.cpu_times()[:2]) - cpu_before
    window = Window(results, measured)
    window.ok()
    own = [r.overhead_ms for r in window.results if r.overhead_ms is not None]
    return window.rps, percentile(own, 50), cpu / len(results) * 1000


EXACT_TENANT = "bench-exact"
EXACT_CLIENTS = 400
EXACT_FITS = 250


def exactness(base_env: dict[str, str], tenants: Path, redis_url: str) -> list[object]:
    """Three gateways on one Redis, `EXACT_CLIENTS` concurrent requests of a
    known token cost against a tokens-per-minute limit that fits
    `EXACT_FITS` of them: how many were admitted, and admitted tokens
    against the limit."""
    from gateway.auth.minting import mint_token
    from gateway.auth.settings import AuthSettings
    from gateway.quota.tokens import count_chat

    messages = [{"role": "user", "content": "count me exactly"}]
    max_tokens = 42
    cost = count_chat(messages) + max_tokens
    limit = EXACT_FITS * cost + cost // 2
    tenant = {
        "id": EXACT_TENANT,
        "display_name": "Exactness",
        "tier": "standard",
        "allowed_models": ["*"],
        "default_priority": "standard",
        "allowed_priorities": ["standard"],
        "limits": {"tokens_per_minute": limit},
    }
    (tenants / f"{EXACT_TENANT}.yaml").write_text(yaml.safe_dump(tenant))
    token = mint_token(AuthSettings(hs_secret=SECRET), tenant=EXACT_TENANT)
    payload = {
        "model": "smollm2",
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": True,  # hold_streams reads chunked bodies
        "x_fake": {"prompt_tokens": count_chat(messages), "completion_tokens": max_tokens},
    }
    raw = build_request(
        "/v1/chat/completions", json.dumps(payload).encode(), {"authorization": f"Bearer {token}"}
    )
    # A burst of 400 requests on three gateways sharing 2 cores delays each
    # event loop by seconds, and the Redis timeout counts loop lag too: the
    # quota-exactness figure is about counting, so the run gives the store
    # time to answer.
    env = {
        **base_env,
        "TOLLGATE_STORE": "redis",
        "TOLLGATE_REDIS_URL": redis_url,
        "TOLLGATE_REDIS_TIMEOUT_S": "2",
    }
    gateways = [GatewayProcess(env) for _ in range(3)]
    for gw in gateways:
        gw.start()
    try:

        async def blast() -> list[Result]:
            return [
                r
                for gw_results in await asyncio.gather(
                    *(
                        hold_streams(gw.port, raw, EXACT_CLIENTS // 3 + (i < EXACT_CLIENTS % 3))
                        for i, gw in enumerate(gateways)
                    )
                )
                for r in gw_results
            ]

        results = run(blast())
    finally:
        for gw in gateways:
            gw.stop()
    admitted = sum(1 for r in results if r.status == 200)
    denied = sum(1 for r in results if r.status == 429)
    return [
        EXACT_CLIENTS,
        limit,
        cost,
        EXACT_FITS,
        admitted,
        denied,
        admitted * cost,
        f"{admitted * cost / limit:.4f}",
    ]


def measure(port: int, raw: bytes, concurrency: int, seconds: float) -> Window:
    """One closed-loop window."""
    results, measured = run(closed_loop(port, raw, concurrency, seconds))
    return Window(results, measured)


def store_cost(
    base_env: dict[str, str],
    work: Path,
    redis: RedisServer,
    auth: dict[str, str],
    seconds: float,
) -> list[list[object]]:
    """What the Redis quota store adds over the memory store, side by side:
    a gateway on the memory store and one on Redis per transport (TCP over
    loopback, and the server's Unix socket) run at once and their windows
    alternate, so drift in what else the machine does falls on all of them.
    Per transport and concurrency: the median, over `STORE_COST_REPS` rounds,
    of Redis p50 (p99) minus memory p50 (p99), and the range of the p50
    differences."""
    transports = {"TCP": redis.url, "Unix socket": redis.unix_url}
    envs = {
        name: {
            **base_env,
            "TOLLGATE_STORE": "redis" if url else "memory",
            "TOLLGATE_REDIS_URL": url or redis.url,
            "TOLLGATE_LEDGER_DIR": str(work / f"ledger-cost-{i}"),
        }
        for i, (name, url) in enumerate({"memory": "", **transports}.items())
    }
    rows: list[list[object]] = []
    with contextlib.ExitStack() as stack:
        gateways = {name: stack.enter_context(gateway(env)) for name, env in envs.items()}
        for concurrency in (1, 16):
            raw = build_request(
                "/v1/chat/completions", body(False, upstream_delay(concurrency)), auth
            )
            p50s: dict[str, list[float]] = {name: [] for name in transports}
            p99s: dict[str, list[float]] = {name: [] for name in transports}
            for _ in range(STORE_COST_REPS):
                m = measure(gateways["memory"].port, raw, concurrency, seconds).latency_ms(False)
                for name in transports:
                    r = measure(gateways[name].port, raw, concurrency, seconds).latency_ms(False)
                    p50s[name].append(percentile(r, 50) - percentile(m, 50))
                    p99s[name].append(percentile(r, 99) - percentile(m, 99))
            for name in transports:
                rows.append(
                    [
                        "json",
                        name,
                        concurrency,
                        statistics.median(p50s[name]),
                        statistics.median(p99s[name]),
                        f"{min(p50s[name]):.2f} to {max(p50s[name]):.2f}",
                    ]
                )
                print(rows[-1], flush=True)
    return rows


ROUND_TRIPS = 200
"""Calls per kind in `redis_round_trips`."""


def redis_round_trips(redis_url: str) -> list[list[object]]:
    """What one call to Redis costs on this machine, from a process of its own
    (this one, idle by now) on uvloop, through the store's own connections:
    a script that does nothing, the bench tenant's admit (with a usage
    record, as the gateway sends it) and its settle. Paced: one call every
    `UPSTREAM_DELAY_MS` ms, as at concurrency 1, where both processes sleep
    between calls; back to back: as fast as they go. p50 in ms."""
    import uuid

    import uvloop

    from gateway.quota.limits import Reservation, Scope
    from gateway.quota.redis_store import RedisQuotaStore, connect
    from gateway.quota.redis_wire import Lane, ScriptCall
    from gateway.usage.record import UsageEntry

    big = 10**12
    scope = Scope(
        f"tenant '{TENANT}'", f"tollgate:q:{{{TENANT}-rt}}:t", "UTC", big, big, 10**5, big, big
    )
    entry = UsageEntry("2026-01-01", b'{"request_id":"' + b"0" * 32 + b'","status":"interrupted"}')
    nothing = ScriptCall("return 1")

    async def rounds(pause_s: float) -> list[object]:
        store = RedisQuotaStore(connect(redis_url, timeout_s=2.0), lease_ttl_s=30.0)
        lane = Lane(connect(redis_url, timeout_s=2.0).connection_pool, max_connections=1)
        timings: dict[str, list[float]] = {"nothing": [], "admit": [], "settle": []}
        try:
            for _ in range(ROUND_TRIPS):
                lease_id = uuid.uuid4().hex
                await asyncio.sleep(pause_s)
                started = time.perf_counter()
                await lane.call(nothing, [], [])
                timings["nothing"].append(time.perf_counter() - started)
                await asyncio.sleep(pause_s)
                started = time.perf_counter()
                admission = await store.admit(
                    Reservation(f"{TENANT}-rt", lease_id, 60, (scope,), entry)
                )
                timings["admit"].append(time.perf_counter() - started)
                assert admission.lease is not None
                await asyncio.sleep(pause_s)
                started = time.perf_counter()
                await store.settle(admission.lease, 60, entry)
                timings["settle"].append(time.perf_counter() - started)
        finally:
            await lane.reset()
            await store.close()
        return [statistics.median(timings[k]) * 1000 for k in ("nothing", "admit", "settle")]

    return [
        ["paced", *uvloop.run(rounds(UPSTREAM_DELAY_MS / 1000))],
        ["back to back", *uvloop.run(rounds(0.0))],
    ]


def hop_floor(
    base_env: dict[str, str], fake: FakeUpstreamProcess, auth: dict[str, str], seconds: float
) -> list[list[object]]:
    """What the extra hop costs by itself: the upstream called directly,
    through `bench/bare_proxy.py` (the gateway's server and upstream client
    with nothing in between) and through the gateway (memory store), windows
    alternating, `FLOOR_REPS` rounds. Per mode and concurrency: the median
    over the rounds of each proxy's p50 minus the direct p50."""
    bare = ServiceProcess(["bench.bare_proxy", "--upstream", fake.url], "/health")
    bare.start(timeout_s=60)
    rows: list[list[object]] = []
    try:
        with gateway(base_env) as gw:
            for stream in (False, True):
                for concurrency in (1, 16):
                    delayed = body(stream, upstream_delay(concurrency))
                    plain = build_request("/v1/chat/completions", delayed)
                    signed = build_request("/v1/chat/completions", delayed, auth)
                    added: dict[str, list[float]] = {"bare": [], "gateway": []}
                    for _ in range(FLOOR_REPS):
                        direct = measure(fake.port, plain, concurrency, seconds)
                        d = percentile(direct.latency_ms(stream), 50)
                        b = measure(bare.port, plain, concurrency, seconds).latency_ms(stream)
                        g = measure(gw.port, signed, concurrency, seconds).latency_ms(stream)
                        added["bare"].append(percentile(b, 50) - d)
                        added["gateway"].append(percentile(g, 50) - d)
                    bare_p50 = statistics.median(added["bare"])
                    gateway_p50 = statistics.median(added["gateway"])
                    rows.append(
                        [
                            "stream" if stream else "json",
                            concurrency,
                            bare_p50,
                            gateway_p50,
                            gateway_p50 - bare_p50,
                        ]
                    )
                    print(rows[-1], flush=True)
    finally:
        bare.stop()
    return rows


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
            # A ledger of the run's own: the default folder would collect every
            # run's records, and a gateway starting over many of them compacts
            # them first (DuckDB), which skews its memory figures.
            "TOLLGATE_LEDGER_DIR": str(work / "ledger"),
        }
        for store in args.stores.split(","):
            env = {**base_env, "TOLLGATE_STORE": store, "TOLLGATE_REDIS_URL": redis.url}
            with gateway(env) as gw:
                for stream in (False, True):
                    for concurrency in CONCURRENCY:
                        delayed = body(stream, upstream_delay(concurrency))
                        direct_raw = build_request("/v1/chat/completions", delayed)
                        via_raw = build_request("/v1/chat/completions", delayed, auth)
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
                rps, own_p50, cpu_ms = throughput(gw, token, args.seconds)
                peak, ok = held_streams_rss(gw, token)
                held.append([store, direct_rps, rps, own_p50, cpu_ms, HELD_STREAMS, ok, peak])
                print(held[-1], flush=True)
        floor_env = {
            **base_env,
            "TOLLGATE_STORE": "memory",
            "TOLLGATE_LEDGER_DIR": str(work / "ledger-floor"),
        }
        floor_rows = hop_floor(floor_env, fake, auth, min(args.seconds, 3.0))
        store_rows: list[list[object]] = []
        if set(args.stores.split(",")) >= {"memory", "redis"}:
            store_rows = store_cost(base_env, work, redis, auth, min(args.seconds, 3.0))
        trips: list[list[object]] = redis_round_trips(redis.url)
        print(trips, flush=True)
        exact = exactness(base_env, tenants, redis.url)
        print(exact, flush=True)
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
            "gateway CPU ms per request",
            "streams held at once",
            "completed ok",
            "gateway peak RSS MiB",
        ],
        held,
    )
    exact_table = markdown_table(
        [
            "requests at once",
            "tokens/min limit",
            "tokens per request",
            "requests that fit",
            "admitted",
            "denied (429)",
            "admitted tokens",
            "admitted / limit",
        ],
        [exact],
    )
    store_table = markdown_table(
        [
            "mode",
            "Redis over",
            "concurrency",
            "Redis minus memory, p50 ms",
            "Redis minus memory, p99 ms",
            f"p50 difference, range over {STORE_COST_REPS} rounds",
        ],
        store_rows,
    )
    trips_table = markdown_table(
        [
            "calls",
            "script that does nothing, p50 ms",
            "admit, p50 ms",
            "settle, p50 ms",
        ],
        trips,
    )
    floor_table = markdown_table(
        [
            "mode",
            "concurrency",
            "bare proxy added p50 ms",
            "gateway added p50 ms",
            "gateway minus bare proxy, ms",
        ],
        floor_rows,
    )
    print(table)
    print(floor_table)
    print(held_table)
    print(store_table)
    print(trips_table)
    print(exact_table)
    write_section(
        "gateway-overhead",
        f"""## Gateway overhead (`bench/gateway_overhead.py`)

{machine}. One gateway process (uvicorn, one worker) with JWT auth, policy
lookup, routing, the priority queue, quotas and the JSON log line on, in front
of the fake upstream in its own process; the load generator is a third
process. In the latency table the fake answers after {UPSTREAM_DELAY_MS} ms (a fast
model call; above concurrency 1, uniformly {UPSTREAM_DELAY_MS} +/- {UPSTREAM_JITTER_MS} ms, because
with a delay that never varies a closed loop's clients fall into lock-step and
arrive as one burst per round: see `UPSTREAM_JITTER_MS` in the script), so
concurrency 16 is a busy gateway rather than a saturated one;
"json" compares whole non-streaming responses, "stream" the first body bytes
of a 16-chunk stream. Each row's direct and gateway windows ran back to back
({args.seconds:.0f} s each, after 1 s of warm-up). The second table measures
throughput with an instant upstream, then holds {HELD_STREAMS} streams of 6 s
open at once. All three processes share 2 cores, so the gateway's req/s is a
lower bound.

Targets: added p50 at most 1 ms and p99 at most 5 ms at concurrency 1 and 16;
at least 1,500 non-streaming req/s; under 200 MB RSS holding 1,000 streams.

{table}

How much of that is the extra hop itself: the same upstream called directly,
through `bench/bare_proxy.py` (uvicorn and the gateway's upstream connections with
nothing in between: no auth, quotas, routing, queue, usage or logs) and
through the gateway on the memory store, {min(args.seconds, 3.0):.0f}-s windows alternating,
median over {FLOOR_REPS} rounds of each proxy's p50 minus the direct p50. The last
column is what the gateway's own work adds on this machine:

{floor_table}

{held_table}

What the Redis quota store adds over the in-process one, measured side by
side: a gateway on the memory store and one on Redis per transport (TCP over
loopback, and the same server's Unix socket) run at once and their
{min(args.seconds, 3.0):.0f}-s windows alternate, {STORE_COST_REPS} rounds per row, each round's
Redis percentile minus its memory percentile, median over the rounds (target
at most 0.3 ms at p50):

{store_table}

What one call to that Redis costs by itself, from an otherwise idle process
through the store's own connections (TCP), {ROUND_TRIPS} calls of each kind:
"paced" waits {UPSTREAM_DELAY_MS} ms before each call, as a gateway at concurrency 1
does between requests, so both processes sleep in between; "back to back"
does not. Only the admit is on a request's path; the settle runs after the
response:

{trips_table}

Quota exactness across replicas: three gateway processes on one Redis,
every request sent at once, against a tokens-per-minute limit that fits
{EXACT_FITS} of them (each request's reservation equals what the fake
backend reports, so settlements are exact; Redis timeout 2 s, as the burst
delays each gateway's event loop by seconds):

{exact_table}
""",
    )


if __name__ == "__main__":
    main()
