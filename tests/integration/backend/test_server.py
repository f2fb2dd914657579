"""The backend over real HTTP with the real bundled model."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.openai_schema import validate
from tests.support.processes import BackendProcess

CHAT = "/v1/chat/completions"
HI = b'{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]'


def chat(url: str, content: str, **fields: object) -> dict[str, object]:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": content}], **fields}
    response = httpx.post(url + CHAT, json=body, timeout=300)
    assert response.status_code == 200, response.text
    data: dict[str, object] = response.json()
    return data


def stream_text(
    url: str, path: str, body: dict[str, object]
) -> tuple[str, list[dict[str, object]]]:
    chunks: list[dict[str, object]] = []
    with httpx.stream("POST", url + path, json=body, timeout=300) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    text = ""
    for chunk in chunks:
        for choice in chunk["choices"]:  # type: ignore[attr-defined]
            text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return text, chunks


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        (b'{"model": "smollm2", "messages": [', 400, None),
        (b'{"model": "smollm2", "messages": "hello"}', 400, None),
        (
            HI + b', "max_tokens": -5}',
            400,
            None,
        ),
        (
            b'{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], '
            b'"max_tokens": 100000000}',
            400,
            "context_length_exceeded",
        ),
        (
            HI + b', "temperature": "hot"}',
            400,
            None,
        ),
        (
            b'{"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}',
            404,
            "model_not_found",
        ),
        (
            b'{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "n": 2}',
            400,
            None,
        ),
        (
            b'{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "wat": 1}',
            400,
            None,
        ),
        (b"[1, 2]", 400, None),
    ],
)
def test_bad_input_gets_a_4xx_in_openai_format(
    backend: BackendProcess, content: bytes, status: int, code: str | None
) -> None:
    response = httpx.post(
        backend.url + CHAT,
        content=content,
        timeout=60,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == status
    body = response.json()
    validate(body, "ErrorResponse")
    if code is not None:
        assert body["error"]["code"] == code
    # ...and the server keeps serving.
    assert chat(backend.url, "Say hi.", max_tokens=2)["choices"]


def test_over_long_prompt_names_the_limits(backend: BackendProcess) -> None:
    response = httpx.post(
        backend.url + "/v1/completions",
        json={"model": "smollm2", "prompt": "word " * 5000, "max_tokens": 4},
        timeout=60,
    )
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "2048" in message and "tokens" in message


def test_chat_stream_concatenates_to_the_non_streamed_text(backend: BackendProcess) -> None:
    body = {
        "model": "smollm2",
        "messages": [
            {
                "role": "user",
                "content": "Write the word for 'hello' in Chinese, "
                "Japanese, Greek and French, with accents: 你好, こんにちは, γειά, héllo.",
            }
        ],
        "max_tokens": 48,
        "temperature": 0,
    }
    whole = chat(backend.url, body["messages"][0]["content"], max_tokens=48, temperature=0)  # type: ignore[index]
    validate(whole, "CreateChatCompletionResponse")
    text, chunks = stream_text(
        backend.url, CHAT, {**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    expected = whole["choices"][0]["message"]["content"]  # type: ignore[index]
    assert text == expected
    assert "\ufffd" not in text
    assert chunks[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]  # type: ignore[index]


def test_seeded_samples_stream_like_they_complete_multibyte_included(
    backend: BackendProcess,
) -> None:
    saw_multibyte = False
    for seed in range(8):
        body = {
            "model": "smollm2",
            "prompt": "汉字 émigré ü 🚀 Ω:",
            "max_tokens": 24,
            "temperature": 1.2,
            "seed": seed,
        }
        whole = httpx.post(backend.url + "/v1/completions", json=body, timeout=120).json()
        validate(whole, "CreateCompletionResponse")
        text, chunks = stream_text(backend.url, "/v1/completions", {**body, "stream": True})
        for chunk in chunks:
            validate(chunk, "CreateCompletionStreamResponse")
        # Equal to the one-piece decode: no character was split between
        # chunks. (A hot sample may itself be invalid UTF-8; both sides then
        # show the same replacement character.)
        assert text == whole["choices"][0]["text"]
        saw_multibyte |= any(ord(c) > 127 for c in text)
    assert saw_multibyte, "no sample produced a multi-byte character"


def test_stop_strings_cut_the_text(backend: BackendProcess) -> None:
    free = chat(backend.url, "Count from one to ten in words.", max_tokens=40, temperature=0)
    text = free["choices"][0]["message"]["content"]  # type: ignore[index]
    words = text.split()
    assert len(words) > 3
    stop = words[2]
    cut = chat(
        backend.url, "Count from one to ten in words.", max_tokens=40, temperature=0, stop=[stop]
    )
    assert cut["choices"][0]["finish_reason"] == "stop"  # type: ignore[index]
    assert cut["choices"][0]["message"]["content"] == text[: text.index(stop)]  # type: ignore[index]


def test_requests_sharing_an_x_request_id_both_complete(backend: BackendProcess) -> None:
    # Clients choose x-request-id; two in flight at once must not share an
    # engine stream (the second would swallow the first's tokens).
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Name three colours."}],
        "max_tokens": 12,
        "temperature": 0,
        "ignore_eos": True,
    }
    headers = {"x-request-id": "same-id-twice"}

    def one() -> dict[str, object]:
        response = httpx.post(backend.url + CHAT, json=body, headers=headers, timeout=300)
        assert response.status_code == 200, response.text
        data: dict[str, object] = response.json()
        return data

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: one(), range(2))
    for data in (first, second):
        # A shared stream would hand one request both sequences' tokens and
        # the other none (or leave it waiting).
        assert data["usage"]["completion_tokens"] == 12  # type: ignore[index]
        assert data["id"] == "chatcmpl-same-id-twice"
        choices: list[dict[str, Any]] = data["choices"]  # type: ignore[assignment]
        assert len(choices) == 1 and choices[0]["finish_reason"] == "length"
        assert choices[0]["message"]["content"].strip()
    # The two texts are not compared: under int4 a step's numerics depend on
    # how many rows it batches (the fused kernel up to 8 rows, the prepacked
    # copy above), so the request that prefilled beside the other's decode
    # may pick a different token at a near tie.


def test_stats_and_metrics(backend: BackendProcess) -> None:
    chat(backend.url, "Hello there.", max_tokens=4)
    stats = httpx.get(backend.url + "/stats").json()
    for key in (
        "num_running",
        "num_waiting",
        "queued_prompt_tokens",
        "active_decode_tokens",
        "kv_usage",
        "num_total_blocks",
        "max_num_seqs",
    ):
        assert key in stats
    assert stats["num_total_blocks"] > 0
    metrics = httpx.get(backend.url + "/metrics").text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:num_preemptions_total",
    ):
        assert name in metrics, name
    assert httpx.get(backend.url + "/health").status_code == 200
    models = httpx.get(backend.url + "/v1/models").json()
    validate(models, "ListModelsResponse")


def test_shared_system_prompt_is_served_from_the_prefix_cache(backend: BackendProcess) -> None:
    system = "You are a terse assistant for the Acme corporation. " * 6
    usages = []
    for question in ("What is two plus two?", "Name a colour."):
        body = {
            "model": "smollm2",
            "max_tokens": 2,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": question},
            ],
        }
        usages.append(httpx.post(backend.url + CHAT, json=body, timeout=60).json()["usage"])
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] >= 64


def _wait_idle(url: str, timeout_s: float = 5) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    stats: dict[str, object] = {}
    while time.monotonic() < deadline:
        stats = httpx.get(url + "/stats").json()
        if stats["num_running"] == 0 and stats["num_free_blocks"] == stats["num_total_blocks"]:
            return stats
        time.sleep(0.05)
    return stats


def test_client_disconnect_frees_the_request_at_once(backend: BackendProcess) -> None:
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Tell a long story."}],
        "max_tokens": 1000,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", backend.url + CHAT, json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        busy = httpx.get(backend.url + "/stats").json()
        assert busy["num_running"] == 1
    stats = _wait_idle(backend.url)
    assert stats["num_running"] == 0
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


@pytest.fixture(scope="module")
def tiny_kv_backend() -> Iterator[BackendProcess]:
    """A backend whose KV pool holds far fewer tokens than its load needs."""
    proc = BackendProcess(
        "--num-kv-blocks",
        "14",
        "--block-size",
        "16",
        "--max-model-len",
        "224",
        "--dtype",
        "float32",
        "--max-num-seqs",
        "8",
        "--threads",
        "1",
    )
    proc.start()
    yield proc
    proc.stop()


def test_a_small_kv_pool_completes_every_request_through_preemption(
    tiny_kv_backend: BackendProcess,
) -> None:
    url = tiny_kv_backend.url
    prompts = [f"Write a short poem about the number {n}." for n in range(6)]
    alone = [chat(url, p, max_tokens=64, temperature=0, ignore_eos=True) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(
            pool.map(lambda p: chat(url, p, max_tokens=64, temperature=0, ignore_eos=True), prompts)
        )
    for a, b in zip(alone, together, strict=True):
        assert b["usage"]["completion_tokens"] == 64  # type: ignore[index]
        assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]  # type: ignore[index]
    metrics = httpx.get(url + "/metrics").text
    preemptions = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("vllm:num_preemptions_total")
    )
    assert preemptions > 0
