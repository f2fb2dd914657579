"""The gateway as a subprocess: one JSON log line per request, never any text."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx

from tests.support.processes import GatewayProcess


def test_one_log_line_per_request_without_prompt_or_completion_text(
    gateway_process: GatewayProcess, mint: Callable[..., str]
) -> None:
    secret = "zebracornflakes"
    response = httpx.post(
        f"{gateway_process.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {mint(app='web')}", "x-request-id": "req-log-1"},
        json={
            "model": "smollm2",
            "max_tokens": 12,
            "temperature": 0,
            "messages": [{"role": "user", "content": f"Repeat after me: {secret}"}],
        },
        timeout=120,
    )
    assert response.status_code == 200
    completion = response.json()["choices"][0]["message"]["content"]
    gateway_process.stop()
    logs = gateway_process.logs()
    records = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    requests = [r for r in records if r.get("event") == "request"]
    assert len(requests) == 1
    record = requests[0]
    assert record["request_id"] == "req-log-1"
    assert record["tenant"] == "acme"
    assert record["app"] == "web"
    assert record["status"] == 200
    assert record["prompt_tokens"] > 0 and record["completion_tokens"] > 0
    assert secret not in logs
    assert completion.strip() and completion.strip() not in logs
