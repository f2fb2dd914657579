"""Load read from live replicas: the built-in backend publishes the same
figures in its own `/stats` and in vLLM-named Prometheus metrics, so the
gateway reads it the same way as kind `tollgate` or kind `vllm`."""

from __future__ import annotations

import asyncio
import threading

import httpx

from gateway.upstream.load import ReplicaLoad, read_load
from tests.support.processes import BackendProcess, FakeUpstreamProcess


async def _both(url: str) -> tuple[ReplicaLoad, ReplicaLoad]:
    async with httpx.AsyncClient() as client:
        return (
            await read_load(client, "tollgate", url, 5),
            await read_load(client, "vllm", url, 5),
        )


def test_backend_load_agrees_between_stats_and_metrics(backend: BackendProcess) -> None:
    idle_stats, idle_metrics = asyncio.run(_both(backend.url))
    assert idle_stats.running == idle_metrics.running == 0
    assert idle_stats.max_running is not None and idle_stats.max_running > 0

    # One long generation in flight: both readings see it running.
    body = {
        "model": "smollm2",
        "prompt": "Count slowly:",
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": True,
    }
    started = threading.Event()

    def generate() -> None:
        with httpx.stream("POST", f"{backend.url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    started.set()

    worker = threading.Thread(target=generate)
    worker.start()
    try:
        assert started.wait(60)
        busy_stats, busy_metrics = asyncio.run(_both(backend.url))
    finally:
        worker.join(120)
    assert busy_stats.running == busy_metrics.running == 1
    assert busy_stats.active_decode_tokens is not None and busy_stats.active_decode_tokens > 0
    assert busy_metrics.kv_usage is not None and busy_metrics.kv_usage > 0


def test_fake_upstream_load_is_read_as_tollgate(fake_upstream: FakeUpstreamProcess) -> None:
    stats, _ = asyncio.run(_both(fake_upstream.url))
    assert stats.running == 0 and stats.max_running == 256
