"""Priority queues over real HTTP: a gateway in front of the fast fake
upstream, with a pool capacity small enough to saturate.

Each request to the fake takes a fixed time (``x_fake.delay_ms``), so a slot
is held for a known time and queue waits come from the gateway alone; the
gateway reports each request's wait in ``x-tollgate-queue-ms``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import yaml

from gateway.settings import GatewaySettings
from tests.conftest import gateway_env
from tests.support.openai_schema import validate
from tests.support.processes import (
    FakeUpstreamProcess,
    GatewayProcess,
    InProcessGateway,
)

TENANTS = ("qa", "qb", "qc")
MESSAGES = [{"role": "user", "content": "hello"}]


def configure(
    policy_dirs: tuple[Path, Path], *, capacity: int, classes: dict[str, dict[str, Any]]
) -> None:
    """One replica of `capacity` slots, the given class overrides, and three
    tenants without quota limits (the queue, not a quota, must be what binds)."""
    tenants, policies = policy_dirs
    models = yaml.safe_load((policies / "models.yaml").read_text())
    models["pools"]["local"]["replicas"] = [
        {"url": "${TOLLGATE_BACKEND_URL}", "weight": 1, "max_in_flight": capacity}
    ]
    (policies / "models.yaml").write_text(yaml.safe_dump(models, sort_keys=False))
    priorities = yaml.safe_load((policies / "priorities.yaml").read_text())
    for name, override in classes.items():
        priorities["priority_classes"][name].update(override)
    (policies / "priorities.yaml").write_text(yaml.safe_dump(priorities, sort_keys=False))
    for tenant in TENANTS:
        doc = {
            "id": tenant,
            "display_name": f"Queue test {tenant}",
            "tier": "standard",
            "allowed_models": ["*"],
            "default_priority": "standard",
            "allowed_priorities": ["interactive", "standard", "batch"],
        }
        (tenants / f"{tenant}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def body(delay_ms: float, **extra: Any) -> dict[str, Any]:
    return {
        "model": "smollm2",
        "messages": MESSAGES,
        "max_tokens": 8,
        "x_fake": {"delay_ms": delay_ms, "completion_tokens": 4},
        **extra,
    }


def auth(mint: Callable[..., str], tenant: str, priority: str | None = None) -> dict[str, str]:
    headers = {"authorization": f"Bearer {mint(tenant)}"}
    if priority is not None:
        headers["x-priority"] = priority
    return headers


def counters(fake: FakeUpstreamProcess) -> dict[str, int]:
    data: dict[str, int] = httpx.get(f"{fake.url}/fake/counters", timeout=5).json()
    return data


def in_process(
    fake: FakeUpstreamProcess, policy_dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> InProcessGateway:
    env = gateway_env(fake.url, *policy_dirs)
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the policy's ${TOLLGATE_BACKEND_URL}
    return InProcessGateway(GatewaySettings.from_env(env))


def queue_stats(gw: InProcessGateway) -> Any:
    """The in-process gateway's queue snapshot of the one pool."""
    app: Any = gw.server.config.app
    (stats,) = app.state.services.queues.stats()
    return stats


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(0.01)
    return time.monotonic() - start


async def closed_loop(
    client: httpx.AsyncClient,
    url: str,
    headers: dict[str, str],
    payload: dict[str, Any],
    done: Callable[[], bool],
    record: list[tuple[float, float]],
    think_s: float = 0.0,
) -> None:
    """Send requests back to back until `done()`; record (finished at, queue ms)."""
    while not done():
        response = await client.post(url, json=payload, headers=headers)
        assert response.status_code == 200, response.text
        record.append((time.monotonic(), float(response.headers["x-tollgate-queue-ms"])))
        if think_s:
            await asyncio.sleep(think_s)


WARMUP_S = 1.0


async def _saturate(
    url: str,
    groups: list[tuple[int, dict[str, str], float]],
    seconds: float,
    delay_ms: float,
    min_samples: int = 0,
) -> list[list[tuple[float, float]]]:
    """Run closed-loop groups of (clients, headers, think_s) for at least
    `seconds`, and on until every group has `min_samples` results after the
    warm-up (a busy machine slows the clients, not the queue's ordering), at
    most 60 s."""
    records: list[list[tuple[float, float]]] = [[] for _ in groups]
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    started = time.monotonic()

    def done() -> bool:
        now = time.monotonic()
        if now - started < seconds:
            return False
        settled = started + WARMUP_S
        enough = all(sum(1 for t, _ in r if t > settled) >= min_samples for r in records)
        return enough or now - started > 60

    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        tasks = [
            closed_loop(client, url, headers, body(delay_ms), done, records[i], think_s=think_s)
            for i, (clients, headers, think_s) in enumerate(groups)
            for _ in range(clients)
        ]
        await asyncio.gather(*tasks)
    return records


# --- (a) interactive against batch --------------------------------------------------


def test_interactive_waits_a_fraction_of_batch_under_saturation(
    fresh_fake: FakeUpstreamProcess, policy_dirs: tuple[Path, Path], mint: Callable[..., str]
) -> None:
    configure(policy_dirs, capacity=4, classes={})
    gw = GatewayProcess(gateway_env(fresh_fake.url, *policy_dirs))
    gw.start(timeout_s=60)
    try:
        url = f"{gw.url}/v1/chat/completions"
        batch, interactive = asyncio.run(
            _saturate(
                url,
                [
                    (24, auth(mint, "qa", "batch"), 0.0),
                    (3, auth(mint, "qb", "interactive"), 0.05),
                ],
                seconds=4.0,
                delay_ms=50,
                min_samples=30,
            )
        )
    finally:
        gw.stop()
    # Skip the first second: the queue is still filling.
    start = min(t for t, _ in batch + interactive) + WARMUP_S
    batch_waits = [ms for t, ms in batch if t > start]
    interactive_waits = [ms for t, ms in interactive if t > start]
    assert len(batch_waits) >= 20 and len(interactive_waits) >= 20
    batch_p50 = statistics.median(batch_waits)
    interactive_p50 = statistics.median(interactive_waits)
    # Saturated: batch really queues (24 clients on 4 slots of 50 ms).
    assert batch_p50 > 100
    assert interactive_p50 <= batch_p50 / 5, (interactive_p50, batch_p50)


# --- (b) two tenants in one class ---------------------------------------------------


def test_a_flooding_tenant_leaves_the_other_its_fair_share(
    fresh_fake: FakeUpstreamProcess, policy_dirs: tuple[Path, Path], mint: Callable[..., str]
) -> None:
    configure(policy_dirs, capacity=4, classes={})
    gw = GatewayProcess(gateway_env(fresh_fake.url, *policy_dirs))
    gw.start(timeout_s=60)
    try:
        url = f"{gw.url}/v1/chat/completions"
        flood, steady = asyncio.run(
            _saturate(
                url,
                # `steady` keeps 10 requests queued: enough that its backlog
                # never runs dry while this process, busy with 44 clients on
                # a loaded machine, is slow to send the next one.
                [(32, auth(mint, "qa"), 0.0), (12, auth(mint, "qb"), 0.0)],
                seconds=4.0,
                delay_ms=50,
                min_samples=40,
            )
        )
    finally:
        gw.stop()
    start = min(t for t, _ in flood + steady) + WARMUP_S
    end = max(t for t, _ in flood + steady) - 0.5
    flood_done = sum(1 for t, _ in flood if start < t < end)
    steady_done = sum(1 for t, _ in steady if start < t < end)
    # Equal requests, so fair by tokens is fair by requests: half each while
    # both are backlogged; first come, first served would give `steady` 12/44.
    share = steady_done / (flood_done + steady_done)
    assert flood_done + steady_done >= 60
    assert share >= 0.5 * 0.9, (steady_done, flood_done)


# --- (c) a client that leaves while queued ----------------------------------------


def raw_request(port: int, token: str, payload: dict[str, Any]) -> socket.socket:
    """Send one request on a bare socket and return it unread."""
    data = msgspec.json.encode(payload)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        f"authorization: Bearer {token}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(head + data)
    return sock


def test_a_client_that_disconnects_while_queued_leaves_the_queue_at_once(
    fresh_fake: FakeUpstreamProcess,
    policy_dirs: tuple[Path, Path],
    mint: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    configure(policy_dirs, capacity=1, classes={})
    gw = in_process(fresh_fake, policy_dirs, monkeypatch)
    gw.start()
    try:
        holder = raw_request(gw.port, mint("qa"), body(1500))
        wait_until(lambda: queue_stats(gw).in_flight == 1)
        queued = raw_request(gw.port, mint("qb"), body(0))
        wait_until(lambda: queue_stats(gw).classes["standard"].num_queued == 1)
        queued.close()
        left_in = wait_until(lambda: queue_stats(gw).classes["standard"].num_queued == 0)
        assert left_in < 0.5
        stats = queue_stats(gw)
        assert stats.in_flight == 1  # the holder is still running
        assert stats.classes["standard"].num_abandoned == 1
        holder.settimeout(10)
        assert holder.recv(64).startswith(b"HTTP/1.1 200")
        holder.close()
        wait_until(lambda: queue_stats(gw).in_flight == 0)
    finally:
        gw.stop()
    seen = counters(fresh_fake)
    assert seen["requests"] == 1  # only the holder reached the backend


# --- (d) full queue and maximum wait ------------------------------------------------


def error_of(response: httpx.Response) -> dict[str, Any]:
    data = response.json()
    validate(data, "ErrorResponse")
    error: dict[str, Any] = data["error"]
    return error


def test_max_wait_and_full_queue_are_503_with_retry_after(
    fresh_fake: FakeUpstreamProcess,
    policy_dirs: tuple[Path, Path],
    mint: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    configure(
        policy_dirs,
        capacity=1,
        classes={"interactive": {"max_queue_wait_s": 0.3, "max_queue_length": 1}},
    )
    gw = in_process(fresh_fake, policy_dirs, monkeypatch)
    gw.start()
    try:
        url = f"{gw.url}/v1/chat/completions"
        holder = raw_request(gw.port, mint("qa"), body(1500))
        wait_until(lambda: queue_stats(gw).in_flight == 1)
        with httpx.Client(timeout=10) as client:

            def waits() -> httpx.Response:
                return client.post(url, json=body(0), headers=auth(mint, "qb", "interactive"))

            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                started = time.monotonic()
                timed_out = pool.submit(waits)
                wait_until(lambda: queue_stats(gw).classes["interactive"].num_queued == 1)
                full = client.post(url, json=body(0), headers=auth(mint, "qb", "interactive"))
                assert full.status_code == 503
                assert error_of(full)["code"] == "queue_full"
                assert int(full.headers["retry-after"]) >= 1
                late = timed_out.result()
                assert 0.25 < time.monotonic() - started < 1.4
            assert late.status_code == 503
            error = error_of(late)
            assert error["code"] == "queue_timeout" and error["type"] == "server_error"
            assert int(late.headers["retry-after"]) >= 1
            assert late.headers["x-request-id"]
        holder.close()
        wait_until(lambda: queue_stats(gw).in_flight == 0)
        stats = queue_stats(gw).classes["interactive"]
        assert (stats.num_rejected_full, stats.num_timed_out) == (1, 1)
    finally:
        gw.stop()
    assert counters(fresh_fake)["requests"] == 1


# --- the request's class, and slots that streams give back ---------------------------


def test_priority_header_is_checked_and_echoed(
    fresh_fake: FakeUpstreamProcess,
    policy_dirs: tuple[Path, Path],
    mint: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    configure(policy_dirs, capacity=2, classes={})
    gw = in_process(fresh_fake, policy_dirs, monkeypatch)
    gw.start()
    try:
        url = f"{gw.url}/v1/chat/completions"
        ok = httpx.post(url, json=body(0), headers=auth(mint, "qa", "interactive"), timeout=10)
        assert ok.status_code == 200
        assert ok.headers["x-tollgate-priority"] == "interactive"
        assert float(ok.headers["x-tollgate-queue-ms"]) == 0.0
        default = httpx.post(url, json=body(0), headers=auth(mint, "qa"), timeout=10)
        assert default.headers["x-tollgate-priority"] == "standard"
        # globex may use standard and batch only.
        denied = httpx.post(
            url,
            json={**body(0), "model": "smollm2-small"},
            headers=auth(mint, "globex", "interactive"),
            timeout=10,
        )
        assert denied.status_code == 403
        assert error_of(denied)["code"] == "priority_not_allowed"
        unknown = httpx.post(url, json=body(0), headers=auth(mint, "qa", "urgent"), timeout=10)
        assert unknown.status_code == 400
        assert error_of(unknown)["code"] == "unknown_priority"
    finally:
        gw.stop()


def test_streams_give_their_slot_back_when_they_end_or_break(
    fresh_fake: FakeUpstreamProcess,
    policy_dirs: tuple[Path, Path],
    mint: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    configure(policy_dirs, capacity=1, classes={})
    gw = in_process(fresh_fake, policy_dirs, monkeypatch)
    gw.start()
    try:
        url = f"{gw.url}/v1/chat/completions"
        headers = auth(mint, "qa")
        for _ in range(3):
            with httpx.stream(
                "POST", url, json=body(0, stream=True), headers=headers, timeout=10
            ) as response:
                assert response.status_code == 200
                assert response.headers["x-tollgate-priority"] == "standard"
                assert b"[DONE]" in response.read()
        wait_until(lambda: queue_stats(gw).in_flight == 0)
        # A stream that had to wait (the disconnect watch ran and was stopped).
        holder = raw_request(gw.port, mint("qb"), body(300))
        wait_until(lambda: queue_stats(gw).in_flight == 1)
        with httpx.stream(
            "POST", url, json=body(0, stream=True), headers=headers, timeout=10
        ) as response:
            assert response.status_code == 200
            assert float(response.headers["x-tollgate-queue-ms"]) > 100
            assert b"[DONE]" in response.read()
        holder.close()
        wait_until(lambda: queue_stats(gw).in_flight == 0)
        # A client that leaves mid-stream frees the slot too.
        slow = {
            **body(0, stream=True),
            "x_fake": {"completion_tokens": 50, "chunk_interval_ms": 50},
        }
        with httpx.stream("POST", url, json=slow, headers=headers, timeout=10) as response:
            # Keep the iterator: a discarded one is closed at once, and closing
            # it closes the response (the client would leave right here).
            chunks = response.iter_raw()
            next(chunks)
            assert queue_stats(gw).in_flight == 1
        wait_until(lambda: queue_stats(gw).in_flight == 0)
        done = httpx.post(url, json=body(0), headers=headers, timeout=10)
        assert done.status_code == 200
        assert float(done.headers["x-tollgate-queue-ms"]) == 0.0
        # A backend error gives the slot back as well.
        failed = httpx.post(
            url, json={**body(0), "x_fake": {"status": 500}}, headers=headers, timeout=10
        )
        assert failed.status_code == 502
        assert queue_stats(gw).in_flight == 0
    finally:
        gw.stop()


# --- a reload changes capacity without losing queued requests -----------------------


def test_a_reload_that_adds_capacity_serves_the_queued_requests(
    fresh_fake: FakeUpstreamProcess,
    policy_dirs: tuple[Path, Path],
    mint: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    configure(policy_dirs, capacity=1, classes={})
    gw = in_process(fresh_fake, policy_dirs, monkeypatch)
    gw.start()
    try:
        url = f"{gw.url}/v1/chat/completions"
        holder = raw_request(gw.port, mint("qa"), body(3000))
        wait_until(lambda: queue_stats(gw).in_flight == 1)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            queued = [
                pool.submit(httpx.post, url, json=body(0), headers=auth(mint, "qb"), timeout=10)
                for _ in range(2)
            ]
            wait_until(lambda: queue_stats(gw).classes["standard"].num_queued == 2)
            configure(policy_dirs, capacity=3, classes={})
            started = time.monotonic()
            responses = [f.result() for f in queued]
            # Served by the new capacity, long before the holder's slot frees.
            assert time.monotonic() - started < 2.0
        assert [r.status_code for r in responses] == [200, 200]
        assert all(float(r.headers["x-tollgate-queue-ms"]) > 0 for r in responses)
        assert queue_stats(gw).capacity == 3
        holder.close()
    finally:
        gw.stop()
