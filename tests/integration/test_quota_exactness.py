"""Quotas across replicas: gateway processes sharing one real Redis, in front
of the fast fake upstream.

- exactness: 3 gateways, 200 concurrent clients, one tokens-per-minute limit:
  nothing over the limit is admitted, nothing that fits is refused;
- a gateway killed with SIGKILL mid-request: its slot and reservation come
  back within the lease TTL;
- Redis stopped and restarted under load: no request hangs, each tenant gets
  its `on_store_failure`, service resumes, and no counter drifts.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from gateway.quota.tokens import count_chat
from tests.conftest import gateway_env
from tests.integration.test_quota_http import point_at, write_tenant
from tests.support.openai_schema import validate
from tests.support.processes import FakeUpstreamProcess, GatewayProcess, RedisServer

MESSAGES = [{"role": "user", "content": "count me exactly"}]
PROMPT = count_chat(MESSAGES)
MAX_TOKENS = 42
COST = PROMPT + MAX_TOKENS
USE_ALL = {"prompt_tokens": PROMPT, "completion_tokens": MAX_TOKENS}
"""The fake reports exactly what was reserved, so every settlement is exact."""

StartGateways = Callable[..., list[GatewayProcess]]


@pytest.fixture
def start_gateways(
    redis_server: RedisServer,
    fake_upstream: FakeUpstreamProcess,
    policy_dirs: tuple[Path, Path],
) -> Iterator[StartGateways]:
    """Start gateway processes on the test's Redis (in parallel: each takes a
    second or two to come up); all are stopped after the test."""
    tenants, policies = policy_dirs
    point_at(policies, fake_upstream.url)
    started: list[GatewayProcess] = []

    def start(count: int, **settings: str) -> list[GatewayProcess]:
        env = {
            **gateway_env(fake_upstream.url, tenants, policies),
            "TOLLGATE_STORE": "redis",
            "TOLLGATE_REDIS_URL": redis_server.url,
            **settings,
        }
        procs = [GatewayProcess(env) for _ in range(count)]
        started.extend(procs)
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(lambda p: p.start(timeout_s=60), procs))
        return procs

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()


def chat(stream: bool = False, **fake: Any) -> dict[str, Any]:
    return {
        "model": "smollm2",
        "messages": MESSAGES,
        "max_tokens": MAX_TOKENS,
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
        "x_fake": {**USE_ALL, **fake},
    }


@dataclass
class Outcome:
    tenant: str
    status: int
    tokens: int
    """prompt + completion tokens the response reported (0 when refused)."""
    counted: bool
    """Whether the gateway reported rate-limit figures (it reached the store)."""
    started: float
    ended: float
    headers: httpx.Headers
    body: dict[str, Any] | None


async def call(
    client: httpx.AsyncClient, gateway: GatewayProcess, token: str, body: dict[str, Any]
) -> Outcome:
    started = time.monotonic()
    tokens = 0
    payload: dict[str, Any] | None = None
    async with client.stream(
        "POST",
        f"{gateway.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {token}"},
        json={k: v for k, v in body.items() if v is not None},
    ) as response:
        raw = await response.aread()
    if response.status_code == 200 and body.get("stream"):
        for line in raw.split(b"\n"):
            if line.startswith(b"data: {") and b'"usage"' in line:
                usage = httpx.Response(200, content=line[6:]).json()["usage"]
                tokens = usage["prompt_tokens"] + usage["completion_tokens"]
    elif response.status_code == 200:
        usage = httpx.Response(200, content=raw).json()["usage"]
        tokens = usage["prompt_tokens"] + usage["completion_tokens"]
    else:
        payload = httpx.Response(response.status_code, content=raw).json()
    return Outcome(
        tenant="",
        status=response.status_code,
        tokens=tokens,
        counted="x-ratelimit-limit-tokens" in response.headers,
        started=started,
        ended=time.monotonic(),
        headers=response.headers,
        body=payload,
    )


def window(client: redis.Redis, tenant: str) -> tuple[int, int]:
    """(requests, tokens) in the tenant-level sliding window, read from Redis."""
    key = f"tollgate:q:{{{tenant}}}:t:win"
    members = [m.decode() for m in client.zrange(key, 0, -1)]
    return len(members), sum(int(m.rsplit("|", 1)[1]) for m in members)


def in_flight(client: redis.Redis, tenant: str) -> tuple[int, int]:
    """(concurrency counter, live leases) of a tenant."""
    prefix = f"tollgate:q:{{{tenant}}}:"
    return int(client.get(prefix + "t:conc") or 0), int(client.hlen(prefix + "leases"))


def day_tokens(client: redis.Redis, tenant: str) -> int:
    keys = client.keys(f"tollgate:q:{{{tenant}}}:t:day:*")
    return sum(int(client.get(k) or 0) for k in keys)


def test_replicas_admit_exactly_the_limit(
    start_gateways: StartGateways,
    policy_dirs: tuple[Path, Path],
    redis_server: RedisServer,
    mint: Callable[..., str],
) -> None:
    fits_first, fits_second = 200, 100
    limit = (fits_first + fits_second) * COST + COST // 2
    write_tenant(policy_dirs[0], "quota-exact", {"tokens_per_minute": limit})
    gateways = start_gateways(3, TOLLGATE_REDIS_TIMEOUT_S="2")
    token = mint("quota-exact")

    async def blast(count: int) -> list[Outcome]:
        limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            return await asyncio.gather(
                *(
                    call(client, gateways[i % 3], token, chat(stream=i % 2 == 0))
                    for i in range(count)
                )
            )

    began = time.monotonic()
    first = asyncio.run(blast(200))
    # 200 concurrent clients whose requests all fit: none may be refused.
    assert [o.status for o in first] == [200] * 200, [o.body for o in first if o.body][:3]
    assert all(o.tokens == COST for o in first)
    second = asyncio.run(blast(200))
    assert time.monotonic() - began < 50, "the test must stay inside one 60 s window"
    admitted = [o for o in second if o.status == 200]
    refused = [o for o in second if o.status != 200]
    # Exactly the requests that fit in what was left: no more, and no fewer.
    assert len(admitted) == fits_second
    for outcome in refused:
        assert outcome.status == 429 and outcome.body is not None
        validate(outcome.body, "ErrorResponse")
        assert outcome.body["error"]["code"] == "rate_limit_exceeded"
        assert int(outcome.headers["retry-after"]) >= 1
        assert int(outcome.headers["x-ratelimit-remaining-tokens"]) < COST
    store = redis.Redis.from_url(redis_server.url)
    time.sleep(0.3)  # stream settlements finish just after the last byte
    assert window(store, "quota-exact") == (300, 300 * COST)
    assert limit >= 300 * COST
    assert in_flight(store, "quota-exact") == (0, 0)


def test_a_killed_gateways_slot_and_reservation_come_back_after_the_ttl(
    start_gateways: StartGateways,
    policy_dirs: tuple[Path, Path],
    redis_server: RedisServer,
    fake_upstream: FakeUpstreamProcess,
    mint: Callable[..., str],
) -> None:
    ttl = 2.0
    write_tenant(policy_dirs[0], "quota-kill", {"max_concurrent": 1, "tokens_per_day": 1_000_000})
    doomed, survivor = start_gateways(2, TOLLGATE_QUOTA_LEASE_TTL_S=str(ttl))
    token = mint("quota-kill")
    headers = {"authorization": f"Bearer {token}"}
    httpx.post(f"{fake_upstream.url}/fake/reset", timeout=5)

    def hold() -> None:
        # Its gateway is killed under it: the connection breaks.
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(
                f"{doomed.url}/v1/chat/completions",
                headers=headers,
                json=chat(delay_ms=60_000),
                timeout=90,
            )

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    deadline = time.monotonic() + 20
    while httpx.get(f"{fake_upstream.url}/fake/counters", timeout=5).json()["in_flight"] < 1:
        assert time.monotonic() < deadline, "the held request never reached the backend"
        time.sleep(0.05)
    store = redis.Redis.from_url(redis_server.url)
    assert in_flight(store, "quota-kill") == (1, 1)
    assert day_tokens(store, "quota-kill") == COST

    busy = httpx.post(
        f"{survivor.url}/v1/chat/completions", headers=headers, json=chat(), timeout=30
    )
    assert busy.status_code == 429
    assert "concurrent" in busy.json()["error"]["message"]

    assert doomed.proc is not None
    doomed.proc.kill()  # SIGKILL: no shutdown, no settlement
    killed_at = time.monotonic()
    while True:
        response = httpx.post(
            f"{survivor.url}/v1/chat/completions", headers=headers, json=chat(), timeout=30
        )
        if response.status_code == 200:
            break
        assert response.status_code == 429, response.text
        assert time.monotonic() - killed_at < ttl + 5, "the dead gateway's lease never expired"
        time.sleep(0.1)
    # Renewals stop with the process, so the lease ends within one TTL of the kill.
    assert time.monotonic() - killed_at < ttl + 1.5
    time.sleep(0.2)
    # The dead request's reservation was refunded; only the new request counts.
    assert in_flight(store, "quota-kill") == (0, 0)
    assert day_tokens(store, "quota-kill") == COST


def test_redis_restart_under_load(
    start_gateways: StartGateways,
    policy_dirs: tuple[Path, Path],
    redis_server: RedisServer,
    mint: Callable[..., str],
) -> None:
    limits = {"tokens_per_minute": 10_000_000, "max_concurrent": 1000}
    write_tenant(policy_dirs[0], "quota-closed", limits, on_store_failure="fail_closed")
    write_tenant(policy_dirs[0], "quota-open", limits, on_store_failure="fail_open")
    gateways = start_gateways(
        2,
        TOLLGATE_REDIS_TIMEOUT_S="0.25",
        TOLLGATE_QUOTA_BREAKER_RESET_S="0.5",
        TOLLGATE_QUOTA_LEASE_TTL_S="3",
    )
    tokens = {tenant: mint(tenant) for tenant in ("quota-closed", "quota-open")}
    marks: dict[str, float] = {}
    # The breaker half-opens 0.5 s after its last failure; a probe that ran
    # just before the restart fails (up to 2 x 0.25 s) and waits once more.
    recovery_s = 2.0

    async def client_loop(
        client: httpx.AsyncClient, index: int, tenant: str, until: float
    ) -> list[Outcome]:
        outcomes = []
        while time.monotonic() < until:
            body = chat(stream=index % 3 == 0, delay_ms=20)
            outcome = await call(client, gateways[index % 2], tokens[tenant], body)
            outcome.tenant = tenant
            outcomes.append(outcome)
            await asyncio.sleep(0.01)
        return outcomes

    async def outage() -> None:
        await asyncio.sleep(1.5)
        marks["stop_begin"] = time.monotonic()
        await asyncio.to_thread(redis_server.stop)
        marks["stop_done"] = time.monotonic()
        await asyncio.sleep(2.0)
        await asyncio.to_thread(redis_server.start)
        marks["restart_done"] = time.monotonic()

    async def run() -> list[Outcome]:
        until = time.monotonic() + 7.0
        async with httpx.AsyncClient(timeout=10) as client:
            loops = [
                client_loop(client, i, ("quota-closed", "quota-open")[i % 2], until)
                for i in range(16)
            ]
            results = await asyncio.gather(outage(), *loops)
        return [o for batch in results[1:] for o in batch]

    outcomes = asyncio.run(run())
    assert outcomes
    # No request hung on the dead Redis.
    slowest = max(o.ended - o.started for o in outcomes)
    assert slowest < 2.0, slowest
    closed = [o for o in outcomes if o.tenant == "quota-closed"]
    opened = [o for o in outcomes if o.tenant == "quota-open"]
    # fail_open: always served; uncounted while Redis was away.
    assert {o.status for o in opened} == {200}
    assert any(not o.counted for o in opened)
    # fail_closed: 503 with Retry-After while Redis was away, nothing else.
    unavailable = [o for o in closed if o.status == 503]
    assert unavailable and {o.status for o in closed} <= {200, 503}
    for outcome in unavailable:
        assert outcome.body is not None
        validate(outcome.body, "ErrorResponse")
        assert outcome.body["error"]["code"] == "quota_unavailable"
        assert int(outcome.headers["retry-after"]) >= 1
        assert marks["stop_begin"] <= outcome.ended
        assert outcome.started <= marks["restart_done"] + recovery_s
    # Normal service after the restart, once the breaker's probe succeeded.
    after = [o for o in outcomes if o.started > marks["restart_done"] + recovery_s]
    assert after and all(o.status == 200 and o.counted for o in after)

    time.sleep(1.5)  # settlements that failed during the outage are retried each TTL/3
    store = redis.Redis.from_url(redis_server.url)
    for tenant in ("quota-closed", "quota-open"):
        mine = [o for o in outcomes if o.tenant == tenant and o.counted and o.status == 200]
        # Admitted by the restarted Redis: started after it came back at the
        # latest, ended after the old one stopped at the earliest.
        low = sum(o.tokens for o in mine if o.started > marks["stop_done"])
        high = sum(o.tokens for o in mine if o.ended > marks["stop_begin"])
        assert low <= window(store, tenant)[1] <= high
        # No drift: nothing in flight, no lease left behind.
        assert in_flight(store, tenant) == (0, 0)
