"""A change to the gateway measured against an earlier commit, side by side.

    python bench/gateway_ab.py --base HEAD~3            # both stores, writes docs/benchmarks.md
    python bench/gateway_ab.py --base main --stores memory --rounds 3

Latency on a shared 2-core machine drifts by more than most single changes
are worth, so figures from two runs at different times say little about a
change. This script checks the base commit out into a temporary worktree and
runs the gateway from it and from this checkout at once, in front of the
same fake upstream (and Redis), with the same settings as
`bench/gateway_overhead.py`. Their measuring windows alternate (direct, then
the two gateways in turns), so both see the same machine.

Figures per store: added p50 (gateway p50 minus the direct p50 of the same
round) at concurrency 1 and 16, json and stream, the median over the rounds
for each side and in how many rounds this checkout was faster; and the
gateway process's CPU time per request at concurrency 64 with an instant
upstream, which depends least on what else the machine does.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psutil
from common import REPO, machine_line, markdown_table, percentile, write_section  # type: ignore[import-not-found]
from gateway_overhead import (  # type: ignore[import-not-found]
    SECRET,
    TENANT,
    Window,
    body,
    measure,
    policy_dirs,
    upstream_delay,
)
from httpload import build_request, closed_loop, run  # type: ignore[import-not-found]

from tests.support.processes import FakeUpstreamProcess, GatewayProcess, RedisServer

SIDES = ("base", "this")


def _git(*args: str) -> str:
    """What a git command in this checkout prints, stripped."""
    done = subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True)
    return done.stdout.strip()


@contextmanager
def worktree(rev: str) -> Iterator[tuple[Path, str]]:
    """``rev`` checked out in a temporary worktree, and its short hash."""
    short = _git("rev-parse", "--short", rev)
    path = Path(tempfile.mkdtemp(prefix="tollgate-base-")) / "tree"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(path), rev],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    try:
        yield path, short
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(path)], cwd=REPO, capture_output=True
        )
        shutil.rmtree(path.parent, ignore_errors=True)


def added_p50(
    gateways: dict[str, GatewayProcess],
    fake_port: int,
    auth: dict[str, str],
    stream: bool,
    concurrency: int,
    rounds: int,
    seconds: float,
) -> dict[str, list[float]]:
    """Per side, each round's gateway p50 minus that round's direct p50 (ms)."""
    delayed = body(stream, upstream_delay(concurrency))
    plain = build_request("/v1/chat/completions", delayed)
    signed = build_request("/v1/chat/completions", delayed, auth)
    added: dict[str, list[float]] = {side: [] for side in SIDES}
    for r in range(rounds):
        direct = percentile(measure(fake_port, plain, concurrency, seconds).latency_ms(stream), 50)
        for side in SIDES if r % 2 == 0 else SIDES[::-1]:
            window = measure(gateways[side].port, signed, concurrency, seconds)
            added[side].append(percentile(window.latency_ms(stream), 50) - direct)
    return added


def cpu_per_request(
    gateways: dict[str, GatewayProcess], auth: dict[str, str], rounds: int, seconds: float
) -> dict[str, list[float]]:
    """Per side and round, the gateway's CPU ms per non-streamed request at
    concurrency 64 against an instant upstream."""
    raw = build_request("/v1/chat/completions", body(False), auth)
    out: dict[str, list[float]] = {side: [] for side in SIDES}
    for r in range(rounds):
        for side in SIDES if r % 2 == 0 else SIDES[::-1]:
            gw = gateways[side]
            assert gw.proc is not None
            proc = psutil.Process(gw.proc.pid)
            before = sum(proc.cpu_times()[:2])
            results, measured = run(closed_loop(gw.port, raw, 64, seconds, warmup_s=0.5))
            Window(results, measured).ok()
            out[side].append((sum(proc.cpu_times()[:2]) - before) / len(results) * 1000)
    return out


def compare(values: dict[str, list[float]]) -> list[object]:
    """Median of each side, the difference, and the rounds this side was lower."""
    base, this = statistics.median(values["base"]), statistics.median(values["this"])
    lower = sum(t < b for b, t in zip(values["base"], values["this"], strict=True))
    return [base, this, this - base, f"{lower} of {len(values['this'])}"]


def main() -> None:
    """Run both gateways side by side per store and write the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare against")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per row")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per window")
    parser.add_argument("--stores", default="memory,redis", help="quota stores, comma-separated")
    args = parser.parse_args()

    from gateway.auth.minting import mint_token
    from gateway.auth.settings import AuthSettings

    machine = machine_line()
    head = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    this_name = f"{head}{' with uncommitted changes' if dirty else ''}"
    token = mint_token(AuthSettings(hs_secret=SECRET), tenant=TENANT, app="bench")
    auth = {"authorization": f"Bearer {token}"}
    work = Path(tempfile.mkdtemp(prefix="tollgate-bench-ab-"))
    latency_rows: list[list[object]] = []
    cpu_rows: list[list[object]] = []
    with ExitStack() as stack:
        base_tree, base_name = stack.enter_context(worktree(args.base))
        fake = FakeUpstreamProcess()
        fake.start()
        stack.callback(fake.stop)
        redis = RedisServer()
        redis.start()
        stack.callback(redis.stop)
        stack.callback(shutil.rmtree, work, True)
        tenants, policies = policy_dirs(work, fake.url)
        for store in args.stores.split(","):
            gateways: dict[str, GatewayProcess] = {}
            with ExitStack() as running:
                for side, tree in (("base", base_tree), ("this", REPO)):
                    env = {
                        "TOLLGATE_TENANTS_DIR": str(tenants),
                        "TOLLGATE_POLICIES_DIR": str(policies),
                        "TOLLGATE_JWT_HS_SECRET": SECRET,
                        "TOLLGATE_LOG_LEVEL": "info",
                        "TOLLGATE_STORE": store,
                        "TOLLGATE_REDIS_URL": redis.url,
                        "TOLLGATE_LEDGER_DIR": str(work / f"ledger-{store}-{side}"),
                        "PYTHONPATH": str(tree),
                    }
                    gw = GatewayProcess(env, cwd=tree)
                    gw.start()
                    running.callback(gw.stop)
                    gateways[side] = gw
                for stream in (False, True):
                    for concurrency in (1, 16):
                        added = added_p50(
                            gateways,
                            fake.port,
                            auth,
                            stream,
                            concurrency,
                            args.rounds,
                            args.seconds,
                        )
                        row = [store, "stream" if stream else "json", concurrency, *compare(added)]
                        latency_rows.append(row)
                        print(row, flush=True)
                cpu = cpu_per_request(gateways, auth, args.rounds, args.seconds)
                cpu_rows.append([store, *compare(cpu)])
                print(cpu_rows[-1], flush=True)

    latency_table = markdown_table(
        [
            "store",
            "mode",
            "concurrency",
            f"added p50 ms, {base_name}",
            f"added p50 ms, {this_name}",
            "difference ms",
            "rounds this checkout was faster",
        ],
        latency_rows,
    )
    cpu_table = markdown_table(
        [
            "store",
            f"CPU ms per request, {base_name}",
            f"CPU ms per request, {this_name}",
            "difference ms",
            "rounds this checkout used less",
        ],
        cpu_rows,
    )
    print(latency_table)
    print(cpu_table)
    write_section(
        "gateway-ab",
        f"""## A change against its base, side by side (`bench/gateway_ab.py`)

{machine}. The gateway at {base_name} (`--base {args.base}`) and at
{this_name}, both running at once in front of the same fake upstream and
Redis, with the settings of `bench/gateway_overhead.py`. Windows of
{args.seconds:.0f} s alternate (direct, then the two gateways, in turns),
{args.rounds} rounds per row; each figure is the median over the rounds.
Added p50 is the gateway's p50 minus the direct p50 of the same round (the
fake answers after 20 ms; json is the whole response, stream the first
event).

{latency_table}

Gateway CPU time per non-streamed request at concurrency 64 with an instant
upstream, windows alternating in the same way:

{cpu_table}
""",
    )


if __name__ == "__main__":
    main()
