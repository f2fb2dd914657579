"""Backend faults a real backend cannot be made to produce on demand, through a
real gateway in front of the fake upstream: slow first bytes, stalls between
chunks, dropped connections, error statuses, an unreachable replica, and a
client that goes away mid-stream."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from gateway.settings import GatewaySettings
from tests.conftest import gateway_env
from tests.support.openai_schema import validate
from tests.support.processes import FakeUpstreamProcess, InProcessGateway, free_port

FIRST_BYTE_S = 1.0
BETWEEN_CHUNKS_S = 0.5


def _timeouts(policies: Path, replicas: list[str]) -> None:
    models = yaml.safe_load((policies / "models.yaml").read_text())
    pool = models["pools"]["local"]
    pool["replicas"] = [{"url": url, "weight": 1, "max_in_flight": 64} for url in replicas]
    pool["timeouts"] = {
        "connect_s": 1,
        "first_byte_s": FIRST_BYTE_S,
        "between_chunks_s": BETWEEN_CHUNKS_S,
        "total_s": 30,
    }
    (policies / "models.yaml").write_text(yaml.safe_dump(models, sort_keys=False))


def _gateway(
    policy_dirs: tuple[Path, Path], replicas: list[str], monkeypatch: pytest.MonkeyPatch
) -> InProcessGateway:
    _timeouts(policy_dirs[1], replicas)
    env = gateway_env(replicas[0], *policy_dirs)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return InProcessGateway(GatewaySettings.from_env(env))


@pytest.fixture
def gw(
    fresh_fake: FakeUpstreamProcess,
    policy_dirs: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[InProcessGateway]:
    """A gateway whose only replica is the fake, with short timeouts."""
    gateway = _gateway(policy_dirs, [fresh_fake.url], monkeypatch)
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


def _chat(fake: dict[str, Any], *, stream: bool = False) -> dict[str, Any]:
    return {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 50,
        "stream": stream,
        "x_fake": fake,
    }


def _counters(fake: FakeUpstreamProcess) -> dict[str, int]:
    data: dict[str, int] = httpx.get(f"{fake.url}/fake/counters", timeout=5).json()
    return data


def _error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    validate(body, "ErrorResponse")
    if code is not None:
        assert body["error"]["code"] == code
    return body


def test_slow_first_byte_is_a_504_in_time(
    gw: InProcessGateway, fresh_fake: FakeUpstreamProcess, mint: Callable[..., str]
) -> None:
    started = time.monotonic()
    response = httpx.post(
        f"{gw.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {mint()}"},
        json=_chat({"delay_ms": 5000}),
        timeout=30,
    )
    elapsed = time.monotonic() - started
    _error(response, 504)
    assert FIRST_BYTE_S * 0.9 <= elapsed < FIRST_BYTE_S + 2


def test_stall_between_chunks_ends_the_stream_with_an_error_event(
    gw: InProcessGateway, fresh_fake: FakeUpstreamProcess, mint: Callable[..., str]
) -> None:
    started = time.monotonic()
    events: list[dict[str, Any]] = []
    with httpx.stream(
        "POST",
        f"{gw.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {mint()}"},
        json=_chat({"stall_after_chunks": 3}, stream=True),
        timeout=30,
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    elapsed = time.monotonic() - started
    contents = [e for e in events if e.get("choices")]
    assert len(contents) == 3
    assert events[-1]["error"]["code"] == "upstream_timeout"
    assert elapsed < BETWEEN_CHUNKS_S + 2


def test_dropped_connection_mid_stream_ends_with_an_error_event(
    gw: InProcessGateway, fresh_fake: FakeUpstreamProcess, mint: Callable[..., str]
) -> None:
    with httpx.stream(
        "POST",
        f"{gw.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {mint()}"},
        json=_chat({"close_after_chunks": 2}, stream=True),
        timeout=30,
    ) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert sum(1 for line in lines if '"choices"' in line) == 2
    last = json.loads(lines[-1][6:])
    assert last["error"]["code"] == "upstream_error"


@pytest.mark.parametrize(
    ("backend_status", "gateway_status"), [(500, 502), (502, 502), (503, 503), (404, 404)]
)
def test_backend_error_statuses_map_to_openai_errors(
    gw: InProcessGateway,
    fresh_fake: FakeUpstreamProcess,
    mint: Callable[..., str],
    backend_status: int,
    gateway_status: int,
) -> None:
    response = httpx.post(
        f"{gw.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {mint()}"},
        json=_chat({"status": backend_status}),
        timeout=30,
    )
    _error(response, gateway_status)
    if gateway_status == 503:
        assert int(response.headers["retry-after"]) >= 1


def test_unreachable_replica_is_skipped_before_any_byte(
    fresh_fake: FakeUpstreamProcess,
    policy_dirs: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    mint: Callable[..., str],
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gateway = _gateway(policy_dirs, [dead, fresh_fake.url], monkeypatch)
    gateway.start()
    try:
        statuses = [
            httpx.post(
                f"{gateway.url}/v1/chat/completions",
                headers={"authorization": f"Bearer {mint()}"},
                json=_chat({}),
                timeout=30,
            ).status_code
            for _ in range(4)
        ]
    finally:
        gateway.stop()
    assert statuses == [200] * 4
    assert _counters(fresh_fake)["completed"] == 4


def test_no_reachable_replica_is_a_503_with_retry_after(
    policy_dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, mint: Callable[..., str]
) -> None:
    gateway = _gateway(policy_dirs, [f"http://127.0.0.1:{free_port()}"], monkeypatch)
    gateway.start()
    try:
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=mint(), max_retries=0)
        with pytest.raises(openai.InternalServerError) as raised:
            client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": "hi"}]
            )
    finally:
        gateway.stop()
    assert raised.value.status_code == 503
    assert int(raised.value.response.headers["retry-after"]) >= 1


def test_client_disconnect_mid_stream_cancels_the_backend_request(
    gw: InProcessGateway, fresh_fake: FakeUpstreamProcess, mint: Callable[..., str]
) -> None:
    # A raw socket, so closing it is an unambiguous disconnect.
    body = json.dumps(_chat({"chunk_interval_ms": 100, "completion_tokens": 200}, stream=True))
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        f"authorization: Bearer {mint()}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n{body}"
    ).encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while received.count(b"data: ") < 2:
            received += sock.recv(65536)
        assert _counters(fresh_fake)["in_flight"] == 1
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and _counters(fresh_fake)["cancelled"] == 0:
        time.sleep(0.05)
    counters = _counters(fresh_fake)
    assert counters["cancelled"] == 1 and counters["in_flight"] == 0
    # 200 chunks at 100 ms would take 20 s; the backend saw only the first few.
    assert counters["completion_tokens"] < 40
