"""Crashes and the usage ledger (real Redis, gateway processes, fake upstream):

- the drainer SIGKILLed between writing a Parquet file and acknowledging its
  records: nothing lost, nothing counted twice in exports;
- a gateway SIGKILLed mid-stream: its request gets an `interrupted` record
  once the lease TTL passes, though its tenant sends nothing more.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

from gateway.quota.redis_store import usage_stream
from tests.integration.test_ledger import LedgerSetup, body, drain_once, ledger_rows
from tests.integration.test_quota_http import write_tenant
from tests.support.processes import REPO, FakeUpstreamProcess, RedisServer


def test_a_drainer_killed_between_write_and_ack_loses_and_duplicates_nothing(
    ledger_gateways: LedgerSetup,
    redis_server: RedisServer,
    policy_dirs: tuple[Path, Path],
    mint: Callable[..., str],
) -> None:
    write_tenant(policy_dirs[0], "ledger-kill", {"max_concurrent": 50})
    (gateway,), env = ledger_gateways(
        redis_server.url, TOLLGATE_LEDGER_DRAINER="off", TOLLGATE_LEDGER_LOCK_TTL_S="2"
    )
    headers = {"authorization": f"Bearer {mint('ledger-kill')}"}
    expected_prompt = 0
    for i in range(30):
        response = httpx.post(
            f"{gateway.url}/v1/chat/completions", headers=headers, json=body(i), timeout=30
        )
        assert response.status_code == 200
        expected_prompt += response.json()["usage"]["prompt_tokens"]

    crashed = drain_once({**env, "TOLLGATE_LEDGER_CRASH_AFTER_WRITE": "1"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    ledger_dir = Path(env["TOLLGATE_LEDGER_DIR"])
    assert len(ledger_rows(ledger_dir)) == 30  # the file is on disk ...
    client = redis.Redis.from_url(redis_server.url)
    assert client.xlen(usage_stream("ledger-kill")) == 30  # ... and never acknowledged

    again = drain_once(env)
    assert again.returncode == 0, again.stderr
    assert "drained 30 records" in again.stdout
    assert client.xlen(usage_stream("ledger-kill")) == 0
    rows = ledger_rows(ledger_dir)
    assert len(rows) == 60  # every record twice on disk; the second copies flagged
    assert sum(r["dedup_check"] for r in rows) == 30

    exported = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "usage",
            "export",
            "--from",
            "2000-01-01",
            "--to",
            "2100-01-01",
            "--tenant",
            "ledger-kill",
            "--group-by",
            "tenant",
            "--format",
            "json",
        ],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert exported.returncode == 0, exported.stderr
    totals = json.loads(exported.stdout)["totals"]
    assert (totals["requests"], totals["prompt_tokens"]) == (30, expected_prompt)


def test_a_gateway_killed_mid_stream_leaves_an_interrupted_record(
    ledger_gateways: LedgerSetup,
    redis_server: RedisServer,
    fake_upstream: FakeUpstreamProcess,
    policy_dirs: tuple[Path, Path],
    mint: Callable[..., str],
) -> None:
    ttl = 2.0
    write_tenant(policy_dirs[0], "ledger-dies", {"max_concurrent": 5})
    (doomed,), env = ledger_gateways(
        redis_server.url, TOLLGATE_LEDGER_DRAINER="off", TOLLGATE_QUOTA_LEASE_TTL_S=str(ttl)
    )
    # The drainer runs on its own (and sweeps expired leases every round).
    drainer = subprocess.Popen(
        [sys.executable, "-m", "gateway", "usage", "drain"],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        headers = {
            "authorization": f"Bearer {mint('ledger-dies')}",
            "x-request-id": "doomed-stream",
        }
        first_chunk = threading.Event()

        def hold() -> None:
            with (
                contextlib.suppress(httpx.HTTPError),
                httpx.stream(
                    "POST",
                    f"{doomed.url}/v1/chat/completions",
                    headers=headers,
                    json=body(0, stream=True, completion_tokens=20, chunk_interval_ms=1000),
                    timeout=60,
                ) as response,
            ):
                for _ in response.iter_bytes():
                    first_chunk.set()

        holder = threading.Thread(target=hold, daemon=True)
        holder.start()
        assert first_chunk.wait(20), "the stream never started"
        assert doomed.proc is not None
        doomed.proc.kill()  # SIGKILL: no settlement, no shutdown
        killed_at = time.monotonic()
        ledger_dir = Path(env["TOLLGATE_LEDGER_DIR"])
        while True:
            rows = [r for r in ledger_rows(ledger_dir) if r["client_request_id"] == "doomed-stream"]
            if rows:
                break
            assert time.monotonic() - killed_at < ttl + 10, "no interrupted record"
            time.sleep(0.2)
        waited = time.monotonic() - killed_at
        (row,) = rows
        assert waited >= ttl - 0.5  # not before the lease could have expired
        assert (row["status"], row["tenant"], row["streamed"]) == (
            "interrupted",
            "ledger-dies",
            True,
        )
        # Charged the reservation by default: prompt estimate + max_tokens (20).
        assert (
            row["completion_tokens"] == 20 and row["reserved_tokens"] == row["prompt_tokens"] + 20
        )
        assert row["usage_reported"] is False and row["latency_ms"] >= ttl * 1000 - 500
    finally:
        drainer.send_signal(signal.SIGTERM)
        try:
            drainer.wait(timeout=20)
        except subprocess.TimeoutExpired:
            drainer.kill()
