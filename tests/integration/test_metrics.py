"""GET /metrics over real HTTP: an in-process gateway in front of the fake
upstream gets a known mix of requests, and every counter and histogram count
in the scrape must match it exactly."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import StartGateway, gateway_env
from tests.integration.test_quota_http import point_at, write_tenant
from tests.support.processes import FakeUpstreamProcess, InProcessGateway
from tests.support.prometheus import Scrape, scrape

MESSAGES = [{"role": "user", "content": "how many tokens is this?"}]
PLAIN = {"prompt_tokens": 7, "completion_tokens": 5}
STREAMED = {"prompt_tokens": 11, "completion_tokens": 4}


@pytest.fixture
def gw(
    fresh_fake: FakeUpstreamProcess,
    policy_dirs: tuple[Path, Path],
    start_gateway: StartGateway,
) -> InProcessGateway:
    tenants, policies = policy_dirs
    point_at(policies, fresh_fake.url)
    write_tenant(tenants, "metrics", {"requests_per_minute": 1000})
    write_tenant(tenants, "tiny", {"tokens_per_minute": 5})
    return start_gateway(gateway_env(fresh_fake.url, tenants, policies))


def chat(gw: InProcessGateway, token: str | None, **body: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    payload = {"model": "smollm2", "messages": MESSAGES, "max_tokens": 50, **body}
    return httpx.post(f"{gw.url}/v1/chat/completions", headers=headers, json=payload, timeout=30)


def stream(gw: InProcessGateway, token: str, **body: Any) -> bytes:
    payload = {"model": "smollm2", "messages": MESSAGES, "max_tokens": 50, "stream": True, **body}
    with httpx.stream(
        "POST",
        f"{gw.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {token}"},
        json=payload,
        timeout=30,
    ) as response:
        assert response.status_code == 200
        return b"".join(response.iter_bytes())


def requests_by_series(m: Scrape) -> dict[tuple[str, str, str], float]:
    found = m.matching("tollgate_requests_total")
    return {
        (dict(key)["tenant"], dict(key)["model"], dict(key)["status"]): value
        for key, value in found.items()
        if value
    }


def test_a_known_mix_is_counted_exactly(
    gw: InProcessGateway, fresh_fake: FakeUpstreamProcess, mint: Callable[..., str]
) -> None:
    token = mint("metrics")
    overheads_ms = []
    for _ in range(3):
        response = chat(gw, token, x_fake=PLAIN)
        assert response.status_code == 200, response.text
        overheads_ms.append(float(response.headers["x-tollgate-overhead-ms"]))
    for _ in range(2):
        assert b"[DONE]" in stream(gw, token, x_fake=STREAMED)
    assert chat(gw, "not-a-token").status_code == 401
    assert chat(gw, token, model="no-such-model").status_code == 404
    refused = chat(gw, mint("tiny"))
    assert refused.status_code == 429, refused.text
    failed = chat(gw, token, x_fake={"status": 500})
    assert failed.status_code == 502, failed.text

    m = scrape(gw.url)
    assert requests_by_series(m) == {
        ("metrics", "smollm2", "200"): 5,
        ("unknown", "other", "401"): 1,
        ("metrics", "other", "404"): 1,
        ("tiny", "smollm2", "429"): 1,
        ("metrics", "smollm2", "502"): 1,
    }
    # End to end: every request once, errors included.
    duration = "tollgate_request_duration_seconds_count"
    assert m.get(duration, tenant="metrics", model="smollm2") == 6
    assert m.get(duration, tenant="unknown", model="other") == 1
    assert m.get(duration, tenant="metrics", model="other") == 1
    assert m.get(duration, tenant="tiny", model="smollm2") == 1
    # First byte: only the answers that had one.
    ttft = "tollgate_time_to_first_token_seconds_count"
    assert sum(m.matching(ttft).values()) == 5
    assert m.get(ttft, tenant="metrics", model="smollm2") == 5
    # Overhead and queue wait: every request that got as far as a slot (the
    # 502 too); the refused ones never did.
    assert m.get("tollgate_gateway_overhead_seconds_count", model="smollm2") == 6
    assert sum(m.matching("tollgate_gateway_overhead_seconds_count").values()) == 6
    overhead_sum = m.get("tollgate_gateway_overhead_seconds_sum", model="smollm2")
    assert overhead_sum * 1000 >= sum(overheads_ms) - 0.01  # the header's figure
    assert m.get("tollgate_queue_wait_seconds_count", pool="local", priority="standard") == 6
    assert (
        m.get("tollgate_queue_wait_seconds_bucket", pool="local", priority="standard", le="0.001")
        == 6
    )
    # Tokens: as the fake upstream reported them.
    tokens = "tollgate_tokens_total"
    assert m.get(tokens, tenant="metrics", model="smollm2", kind="prompt") == 3 * 7 + 2 * 11
    assert m.get(tokens, tenant="metrics", model="smollm2", kind="completion") == 3 * 5 + 2 * 4
    assert m.get(tokens, tenant="metrics", model="smollm2", kind="cached") == 0
    assert sum(m.matching(tokens, tenant="tiny").values()) == 0
    # Why the refusals and failures happened.
    assert m.matching("tollgate_quota_denials_total") == {
        frozenset({("tenant", "tiny"), ("reason", "tokens_per_minute")}): 1
    }
    assert {k: v for k, v in m.matching("tollgate_upstream_errors_total").items() if v} == {
        frozenset({("pool", "local"), ("kind", "status")}): 1
    }
    # Nothing left in flight once every response ended.
    assert set(m.matching("tollgate_in_flight_requests").values()) == {0}
    # The state families read at scrape time.
    replica = {"pool": "local", "replica": fresh_fake.url}
    assert m.get("tollgate_replica_healthy", **replica) == 1
    assert m.get("tollgate_replica_requests_total", **replica) == 6
    assert m.get("tollgate_replica_failures_total", **replica) >= 1
    assert m.get("tollgate_queue_depth", pool="local", priority="standard") == 0
    assert (
        m.get(
            "tollgate_queue_rejections_total", pool="local", priority="batch", reason="queue_full"
        )
        == 0
    )
    assert m.get("tollgate_policy_reloads_total", result="ok") == 0
    assert m.get("tollgate_policy_last_reload_success") == 1
    assert m.get("tollgate_quota_store_up") == 1
    assert m.get("tollgate_quota_store_breaker_trips_total") == 0
    assert m.types["tollgate_request_duration_seconds"] == "histogram"
    assert m.types["tollgate_in_flight_requests"] == "gauge"
    assert not [key for key in m.samples if key[0].endswith("_created")]


def wait_until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def settled(gw: InProcessGateway, tenant: str, status: str, count: int) -> Callable[[], bool]:
    """True once `count` requests of `tenant` ended with `status` and none is in flight."""

    def check() -> bool:
        m = scrape(gw.url)
        done = m.get("tollgate_requests_total", tenant=tenant, model="smollm2", status=status)
        return done == count and set(m.matching("tollgate_in_flight_requests").values()) <= {0}

    return check


def test_a_client_leaving_mid_stream_counts_once(
    gw: InProcessGateway, mint: Callable[..., str]
) -> None:
    payload = {
        "model": "smollm2",
        "messages": MESSAGES,
        "max_tokens": 50,
        "stream": True,
        "x_fake": {"completion_tokens": 40, "chunk_interval_ms": 50},
    }
    headers = {"authorization": f"Bearer {mint('metrics')}"}
    with httpx.stream(
        "POST", f"{gw.url}/v1/chat/completions", headers=headers, json=payload, timeout=30
    ) as response:
        assert response.status_code == 200
        next(response.iter_bytes())  # one chunk, then hang up
    wait_until(settled(gw, "metrics", "200", 1))
    m = scrape(gw.url)
    assert sum(m.matching("tollgate_requests_total").values()) == 1
    labels = {"tenant": "metrics", "model": "smollm2"}
    assert m.get("tollgate_request_duration_seconds_count", **labels) == 1
    assert m.get("tollgate_time_to_first_token_seconds_count", **labels) == 1


def test_a_client_gone_before_the_stream_starts_counts_once(
    gw: InProcessGateway, mint: Callable[..., str]
) -> None:
    payload = {
        "model": "smollm2",
        "messages": MESSAGES,
        "max_tokens": 5,
        "stream": True,
        "x_fake": {"delay_ms": 400},
    }
    headers = {"authorization": f"Bearer {mint('metrics')}"}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{gw.url}/v1/chat/completions", headers=headers, json=payload, timeout=0.1)
    wait_until(settled(gw, "metrics", "200", 1))
    time.sleep(0.3)  # nothing more arrives later
    assert sum(scrape(gw.url).matching("tollgate_requests_total").values()) == 1


def test_a_client_leaving_the_queue_is_a_499(
    fresh_fake: FakeUpstreamProcess,
    policy_dirs: tuple[Path, Path],
    start_gateway: StartGateway,
    mint: Callable[..., str],
) -> None:
    tenants, policies = policy_dirs
    point_at(policies, fresh_fake.url)
    models = yaml.safe_load((policies / "models.yaml").read_text())
    models["pools"]["local"]["replicas"][0]["max_in_flight"] = 1  # one slot
    (policies / "models.yaml").write_text(yaml.safe_dump(models, sort_keys=False))
    write_tenant(tenants, "metrics", {"requests_per_minute": 1000})
    gw = start_gateway(gateway_env(fresh_fake.url, tenants, policies))
    token = mint("metrics")
    holder = threading.Thread(target=chat, args=(gw, token), kwargs={"x_fake": {"delay_ms": 1500}})
    holder.start()
    try:
        wait_until(lambda: scrape(gw.url).get("tollgate_in_flight_requests", model="smollm2") == 1)
        with pytest.raises(httpx.TimeoutException):
            httpx.post(
                f"{gw.url}/v1/chat/completions",
                headers={"authorization": f"Bearer {token}"},
                json={"model": "smollm2", "messages": MESSAGES, "max_tokens": 5},
                timeout=0.3,
            )
    finally:
        holder.join()
    wait_until(settled(gw, "metrics", "499", 1))
    m = scrape(gw.url)
    assert m.get("tollgate_requests_total", tenant="metrics", model="smollm2", status="200") == 1
    # Only the request that got the slot waited in the queue's histogram.
    assert m.get("tollgate_queue_wait_seconds_count", pool="local", priority="standard") == 1
