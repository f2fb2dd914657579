"""The usage ledger end to end: gateway processes on a real Redis in front of
the fake upstream, the drainer writing Parquet, exports over it.

- reconciliation: a few hundred requests (streamed and not, cancelled by the
  client, failing upstream, refused by the backend, denied by quota) ->
  exactly one record per admitted request, with the tokens the backend
  reported;
- Redis restarted with append-only persistence: no record lost;
- `GET /v1/usage`: finance sees every tenant, a tenant admin only its own,
  a user nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest
import redis

from gateway.policy.loader import load_policy
from gateway.quota.redis_store import usage_stream
from gateway.usage.export import ExportQuery, parse_query, run_export
from gateway.usage.ledger import Ledger
from tests.conftest import StartGateway, gateway_env
from tests.integration.test_quota_http import point_at, write_tenant
from tests.support.processes import REPO, FakeUpstreamProcess, GatewayProcess, InProcessGateway
from tests.support.processes import RedisServer as RedisServerProcess

MESSAGES = [{"role": "user", "content": "bill me exactly"}]
TODAY = dt.datetime.now(dt.UTC).date()
ALL_DAYS = (TODAY - dt.timedelta(days=1), TODAY + dt.timedelta(days=1))

LedgerSetup = Callable[..., tuple[list[GatewayProcess], dict[str, str]]]


@pytest.fixture
def ledger_gateways(
    fake_upstream: FakeUpstreamProcess, policy_dirs: tuple[Path, Path]
) -> Iterator[LedgerSetup]:
    """Start gateway processes on a given Redis; returns them and their env."""
    tenants, policies = policy_dirs
    # Some tests here send deliberate 500s through the only replica: they are
    # about records, and a burst of three must not eject it (routing tests
    # cover ejection).
    point_at(policies, fake_upstream.url, health={"failures_to_eject": 1000})
    started: list[GatewayProcess] = []

    def start(redis_url: str, count: int = 1, **settings: str) -> Any:
        env = {
            **gateway_env(fake_upstream.url, tenants, policies),
            "TOLLGATE_STORE": "redis",
            "TOLLGATE_REDIS_URL": redis_url,
            "TOLLGATE_REDIS_TIMEOUT_S": "1",
            "TOLLGATE_LEDGER_DRAIN_INTERVAL_S": "0.3",
            **settings,
        }
        procs = [GatewayProcess(env) for _ in range(count)]
        for proc in procs:
            proc.start(timeout_s=60)
        started.extend(procs)
        return procs, env

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()


def ledger_rows(ledger_dir: Path) -> list[dict[str, Any]]:
    files = [str(f) for f in Ledger(ledger_dir).files(*ALL_DAYS)]
    if not files:
        return []
    relation = duckdb.sql(f"SELECT * FROM read_parquet({files})")
    return [dict(zip(relation.columns, row, strict=True)) for row in relation.fetchall()]


def drain_once(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "usage", "drain", "--once"],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def body(i: int, *, stream: bool = False, **fake: Any) -> dict[str, Any]:
    return {
        "model": "smollm2",
        "messages": MESSAGES,
        "max_tokens": 20,
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
        "x_fake": {"prompt_tokens": 10 + i % 13, "completion_tokens": 1 + i % 7, **fake},
    }


async def one_request(
    client: httpx.AsyncClient, url: str, token: str, i: int, kind: str
) -> tuple[str, str, int, tuple[int, int] | None]:
    """(request id, kind, status, (prompt, completion) the client saw)."""
    rid = f"rec-{i}"
    headers = {"authorization": f"Bearer {token}", "x-request-id": rid}
    stream = kind in ("stream", "cancel")
    fake: dict[str, Any] = {}
    if kind == "cancel":
        fake = {"completion_tokens": 20, "chunk_interval_ms": 50}
    elif kind == "fail":
        fake = {"status": 500}
    elif kind == "refused":
        fake = {"status": 400}
    payload = body(i, stream=stream, **fake)
    async with client.stream(
        "POST", f"{url}/v1/chat/completions", headers=headers, json=payload
    ) as response:
        if kind == "cancel" and response.status_code == 200:
            async for _ in response.aiter_bytes():
                break  # the client leaves after the first chunk
            return rid, kind, response.status_code, None
        raw = await response.aread()
    seen = None
    if response.status_code == 200:
        for part in raw.split(b"\n"):
            if part.startswith(b"data: {") and b'"usage"' in part:
                usage = httpx.Response(200, content=part[6:]).json()["usage"]
                seen = (usage["prompt_tokens"], usage["completion_tokens"])
        if not stream:
            usage = httpx.Response(200, content=raw).json()["usage"]
            seen = (usage["prompt_tokens"], usage["completion_tokens"])
    return rid, kind, response.status_code, seen


def test_reconciliation_one_record_per_admitted_request(
    ledger_gateways: LedgerSetup,
    redis_server: RedisServerProcess,
    policy_dirs: tuple[Path, Path],
    mint: Callable[..., str],
) -> None:
    tenants, policies = policy_dirs
    write_tenant(tenants, "ledger-rec", {"max_concurrent": 100})
    write_tenant(tenants, "ledger-deny", {"requests_per_minute": 10})
    gateways, env = ledger_gateways(redis_server.url, 2)
    tokens = {t: mint(t, subject=f"user-of-{t}") for t in ("ledger-rec", "ledger-deny")}
    kinds = ["plain", "stream", "cancel", "fail", "refused", "plain", "stream", "deny"]
    total = 240

    async def blast() -> list[tuple[str, str, int, tuple[int, int] | None]]:
        gate = asyncio.Semaphore(12)
        async with httpx.AsyncClient(timeout=30) as client:

            async def run(i: int) -> tuple[str, str, int, tuple[int, int] | None]:
                kind = kinds[i % len(kinds)]
                tenant = "ledger-deny" if kind == "deny" else "ledger-rec"
                async with gate:
                    url = gateways[i % 2].url
                    return await one_request(client, url, tokens[tenant], i, kind)

            return await asyncio.gather(*(run(i) for i in range(total)))

    outcomes = asyncio.run(blast())
    by_kind: dict[str, list[tuple[str, str, int, tuple[int, int] | None]]] = {}
    for outcome in outcomes:
        by_kind.setdefault(outcome[1], []).append(outcome)
    assert {o[2] for o in by_kind["plain"] + by_kind["stream"]} == {200}
    assert {o[2] for o in by_kind["fail"]} == {502}
    assert {o[2] for o in by_kind["refused"]} == {400}
    denied = [o for o in by_kind["deny"] if o[2] == 429]
    assert denied and len(denied) == len(by_kind["deny"]) - 10
    admitted = {o[0]: o for o in outcomes if o[2] != 429}

    for gw in gateways:  # SIGTERM: each drains one last time on the way out
        gw.stop()
    rows = ledger_rows(Path(env["TOLLGATE_LEDGER_DIR"]))
    # Exactly one record per admitted request, none for a denied one.
    assert sorted(r["client_request_id"] for r in rows) == sorted(admitted)
    assert len({r["request_id"] for r in rows}) == len(rows)
    for row in rows:
        _, kind, _, seen = admitted[row["client_request_id"]]
        assert row["tenant"] in ("ledger-rec", "ledger-deny")
        assert row["user"] == f"user-of-{row['tenant']}"
        assert (row["model_requested"], row["model"], row["priority"]) == (
            "smollm2",
            "smollm2",
            "standard",
        )
        assert row["streamed"] == (kind in ("stream", "cancel"))
        if kind in ("plain", "stream", "deny"):
            assert (row["status"], row["http_status"], row["usage_reported"]) == ("ok", 200, True)
            assert (row["prompt_tokens"], row["completion_tokens"]) == seen
            assert row["replica"] and row["latency_ms"] > 0
        elif kind == "cancel":
            assert (row["status"], row["usage_reported"]) == ("cancelled", False)
            assert row["ttft_ms"] is not None
        elif kind == "fail":
            assert (row["status"], row["http_status"], row["error_code"]) == (
                "error",
                502,
                "upstream_error",
            )
        else:
            assert (row["status"], row["http_status"]) == ("error", 400)
            assert (row["prompt_tokens"], row["completion_tokens"]) == (0, 0)
    # The token sums equal what the backend reported to the clients.
    reported = [o[3] for o in admitted.values() if o[3] is not None]
    ok_rows = [r for r in rows if r["status"] == "ok"]
    assert sum(r["prompt_tokens"] for r in ok_rows) == sum(p for p, _ in reported)
    assert sum(r["completion_tokens"] for r in ok_rows) == sum(c for _, c in reported)
    # And the export agrees.
    pricing = load_policy(tenants, policies).pricing
    result = run_export(
        Ledger(Path(env["TOLLGATE_LEDGER_DIR"])),
        pricing,
        ExportQuery(*ALL_DAYS, group_by=("tenant", "status")),
    )
    assert result.totals["requests"] == len(admitted)
    assert result.totals["prompt_tokens"] == sum(r["prompt_tokens"] for r in rows)
    assert result.totals["cost"] > 0


def test_redis_restarted_with_append_only_persistence_loses_nothing(
    ledger_gateways: LedgerSetup, policy_dirs: tuple[Path, Path], mint: Callable[..., str]
) -> None:
    server = RedisServerProcess(appendonly=True)
    server.start()
    try:
        write_tenant(policy_dirs[0], "ledger-aof", {"max_concurrent": 50})
        (gateway,), env = ledger_gateways(
            server.url, TOLLGATE_LEDGER_DRAINER="off", TOLLGATE_QUOTA_BREAKER_RESET_S="0.2"
        )
        headers = {"authorization": f"Bearer {mint('ledger-aof')}"}

        def send(count: int) -> None:
            for i in range(count):
                deadline = time.monotonic() + 20
                while True:
                    response = httpx.post(
                        f"{gateway.url}/v1/chat/completions",
                        headers=headers,
                        json=body(i, stream=i % 2 == 0),
                        timeout=30,
                    )
                    if response.status_code != 503:  # Redis coming back
                        break
                    assert time.monotonic() < deadline, response.text
                    time.sleep(0.1)
                assert response.status_code == 200, response.text

        send(10)
        first = drain_once(env)
        assert first.returncode == 0, first.stderr
        send(15)
        time.sleep(0.5)  # stream settlements land just after the last byte
        client = redis.Redis.from_url(server.url)
        assert client.xlen(usage_stream("ledger-aof")) == 15
        server.restart()
        client = redis.Redis.from_url(server.url)
        assert client.xlen(usage_stream("ledger-aof")) == 15  # nothing lost
        send(5)
        time.sleep(0.5)
        second = drain_once(env)
        assert second.returncode == 0, second.stderr
        rows = ledger_rows(Path(env["TOLLGATE_LEDGER_DIR"]))
        assert len(rows) == 30 and {r["status"] for r in rows} == {"ok"}
    finally:
        server.stop()


@pytest.fixture
def usage_gateway(
    fake_upstream: FakeUpstreamProcess,
    policy_dirs: tuple[Path, Path],
    start_gateway: StartGateway,
) -> InProcessGateway:
    """An in-process gateway whose ledger holds two tenants' usage."""
    from tests.unit.gateway.usage.conftest import entry, line

    tenants, policies = policy_dirs
    env = gateway_env(fake_upstream.url, tenants, policies)
    ledger = Ledger(Path(env["TOLLGATE_LEDGER_DIR"]))
    day_ms = round(dt.datetime(2025, 6, 1, 12, tzinfo=dt.UTC).timestamp() * 1000)
    ledger.write(
        [
            line(entry("acme", model="smollm2", prompt=1000, completion=100, started_ms=day_ms)),
            line(entry("acme", model="smollm2", prompt=10, completion=0, started_ms=day_ms)),
            line(entry("globex", model="smollm2-small", prompt=7, started_ms=day_ms)),
        ]
    )
    return start_gateway(env)


def test_usage_endpoint_authorization(
    usage_gateway: InProcessGateway, mint: Callable[..., str]
) -> None:
    def get(token: str, **params: str) -> httpx.Response:
        query = {"from": "2025-06-01", "to": "2025-06-30", "group_by": "tenant", **params}
        return httpx.get(
            f"{usage_gateway.url}/v1/usage",
            params=query,
            headers={"authorization": f"Bearer {token}"},
            timeout=30,
        )

    user = get(mint("acme"))
    assert user.status_code == 403
    assert user.json()["error"]["code"] == "permission_denied"
    admin = get(mint("acme", roles=["admin"]))
    assert admin.status_code == 200, admin.text
    assert [(r["tenant"], r["requests"]) for r in admin.json()["data"]] == [("acme", 2)]
    # smollm2 at 0.20 in / 0.60 out per million: (1010 * 0.20 + 100 * 0.60) / 1e6
    assert admin.json()["totals"]["cost"] == "0.000262"
    assert get(mint("acme", roles=["admin"]), tenant="globex").status_code == 403
    finance = get(mint("acme", roles=["finance"]))
    assert [r["tenant"] for r in finance.json()["data"]] == ["acme", "globex"]
    one = get(mint("acme", roles=["finance"]), tenant="globex", format="csv")
    assert one.headers["content-type"].startswith("text/csv")
    lines = one.text.strip().splitlines()
    assert lines[1].startswith("globex,1,7,") and lines[-1].startswith("total,1,7,")
    bad = get(mint("acme", roles=["finance"]), to="2025-05-01")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "to"
    assert parse_query("2025-06-01", "2025-06-30").group_by == ("tenant", "model", "day")
