"""The `tensorrt_llm` engine end to end: a real model, TensorRT-LLM and the OpenAI server.

Runs only where `tensorrt_llm` imports and a CUDA GPU is visible (NVIDIA's
TensorRT-LLM release image on a GPU machine); everywhere else the module is
skipped with the reason. The model is `$TOLLGATE_TRTLLM_MODEL` when set (a
checkpoint folder, such as a downloaded nvidia/Llama-3.1-8B-Instruct-FP8),
else the bundled SmolLM2-135M-Instruct converted to a safetensors folder.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import time
from collections.abc import Iterator

import httpx
import pytest

torch = pytest.importorskip("torch", reason="needs torch (the backend extra)")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU for TensorRT-LLM", allow_module_level=True)
pytest.importorskip(
    "tensorrt_llm",
    reason="TensorRT-LLM is not installed: run in nvcr.io/nvidia/tensorrt-llm/release:<tag>",
)

from tests.integration.backend.test_server import chat as server_chat  # noqa: E402
from tests.support.processes import BackendProcess  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

NAME = "trt"
CHAT = "/v1/chat/completions"


def _model_args() -> list[str]:
    given = os.environ.get("TOLLGATE_TRTLLM_MODEL")
    if given:
        return ["--model", given]
    from backend.models.loader import resolve_model_dir

    # The converted folder is float32, which TensorRT-LLM's attention does not run.
    return ["--model", str(resolve_model_dir(None)), "--dtype", "bfloat16"]


@pytest.fixture(scope="module")
def backend() -> Iterator[BackendProcess]:
    proc = BackendProcess(
        "--engine",
        "tensorrt_llm",
        *_model_args(),
        "--served-name",
        NAME,
        "--max-model-len",
        "4096",
        "--max-num-seqs",
        "16",
        "--trtllm-kv-cache-fraction",
        "0.3",
    )
    proc.start(timeout_s=900)
    try:
        yield proc
    finally:
        proc.stop()


chat = functools.partial(server_chat, model=NAME)
"""The torch engine's server tests' `chat`, asking for this engine's model."""


def text_of(data: dict[str, object]) -> str:
    return str(data["choices"][0]["message"]["content"])  # type: ignore[index]


def stream_text(url: str, body: dict[str, object]) -> tuple[str, dict[str, object] | None]:
    text, usage = "", None
    with httpx.stream("POST", url + CHAT, json=body, timeout=300) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk["choices"]:
                text += choice["delta"].get("content") or ""
            usage = chunk.get("usage") or usage
    return text, usage


def test_chat_completion_with_usage(backend: BackendProcess) -> None:
    data = chat(backend.url, "What is the capital of France?", max_tokens=32, temperature=0)
    assert text_of(data).strip()
    usage = data["usage"]
    assert usage["prompt_tokens"] > 5  # type: ignore[index]
    assert 0 < usage["completion_tokens"] <= 32  # type: ignore[index]
    assert data["choices"][0]["finish_reason"] in ("stop", "length")  # type: ignore[index]


def test_stream_concatenates_to_the_greedy_text(backend: BackendProcess) -> None:
    prompt = "List three colours, comma separated."
    whole = chat(backend.url, prompt, max_tokens=40, temperature=0)
    body = {
        "model": NAME,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 40,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    text, usage = stream_text(backend.url, body)
    assert text == text_of(whole)
    assert usage == whole["usage"]


def test_a_seed_reproduces_a_sample_and_no_seed_varies(backend: BackendProcess) -> None:
    prompt = "Write a one-line poem about the sea."
    a = chat(backend.url, prompt, max_tokens=30, temperature=1.0, seed=7)
    b = chat(backend.url, prompt, max_tokens=30, temperature=1.0, seed=7)
    assert text_of(a) == text_of(b)
    unseeded = {
        text_of(chat(backend.url, prompt, max_tokens=30, temperature=1.0)) for _ in range(4)
    }
    assert len(unseeded) > 1


def test_max_tokens_and_stop_strings(backend: BackendProcess) -> None:
    long = chat(backend.url, "Count from one to twenty in words.", max_tokens=24, temperature=0)
    text = text_of(long)
    if long["choices"][0]["finish_reason"] == "length":  # type: ignore[index]
        assert long["usage"]["completion_tokens"] == 24  # type: ignore[index]
    words = [w for w in text.split() if len(w) > 3]
    assert words, text
    stop = words[min(2, len(words) - 1)]
    cut = chat(
        backend.url, "Count from one to twenty in words.", max_tokens=24, temperature=0, stop=[stop]
    )
    assert cut["choices"][0]["finish_reason"] == "stop"  # type: ignore[index]
    assert text_of(cut) == text[: text.index(stop)]


def test_shared_system_prompt_is_served_from_the_kv_cache(backend: BackendProcess) -> None:
    system = "You are a terse assistant for the Acme corporation. " * 12
    usages = []
    for question in ("What is two plus two?", "Name a colour."):
        body = {
            "model": NAME,
            "max_tokens": 2,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": question},
            ],
        }
        usages.append(httpx.post(backend.url + CHAT, json=body, timeout=300).json()["usage"])
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] >= 64


def test_stats_and_metrics_show_the_engine_load(backend: BackendProcess) -> None:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        busy = pool.submit(chat, backend.url, "Tell a long story.", max_tokens=400, ignore_eos=True)
        time.sleep(1.0)
        stats = httpx.get(backend.url + "/stats").json()
        busy.result()
    assert stats["num_running"] + stats["num_waiting"] >= 1
    assert stats["num_total_blocks"] > 0
    assert 0 < stats["kv_usage"] <= 1
    assert stats["max_num_seqs"] == 16
    metrics = httpx.get(backend.url + "/metrics").text
    for name in (
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:generation_tokens_total",
    ):
        assert name in metrics, name


def test_client_disconnect_frees_the_request(backend: BackendProcess) -> None:
    body = {
        "model": NAME,
        "messages": [{"role": "user", "content": "Tell a long story."}],
        "max_tokens": 2000,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", backend.url + CHAT, json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
    deadline = time.monotonic() + 10
    stats: dict[str, object] = {}
    while time.monotonic() < deadline:
        stats = httpx.get(backend.url + "/stats").json()
        if stats["num_running"] == 0 and stats["num_waiting"] == 0:
            break
        time.sleep(0.1)
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0


def test_logprobs_are_refused(backend: BackendProcess) -> None:
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "logprobs": True}
    response = httpx.post(backend.url + CHAT, json=body, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "logprobs"
