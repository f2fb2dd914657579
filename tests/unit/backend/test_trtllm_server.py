"""The OpenAI server in front of the `tensorrt_llm` engine, with a stand-in for the LLM.

The real app, serving layer, tokenizer and `TrtllmEngine`; only
`tensorrt_llm.LLM` is replaced (tests/support/fake_trtllm.py). What TensorRT-LLM
itself does on a GPU is covered by
tests/integration/backend/test_trtllm_engine.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")

import httpx
import uvicorn

from backend.api.server import BackendState, create_app
from backend.engine.trtllm.engine import TrtllmEngine
from backend.engine.trtllm.stats import StatsLimits
from backend.serving.generation import GenerationService
from backend.serving.metrics import EngineMetrics
from backend.tokenizer import Tokenizer
from tests.support.fake_trtllm import FakeLLM, next_token, sampling_params
from tests.support.processes import free_port

MODEL = "tiny-fp8"
MAX_MODEL_LEN = 256
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(["hello world", "the cat sat on the mat"] * 20, trainer)
    folder = tmp_path_factory.mktemp("tiny-fp8")
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "chat_template": TEMPLATE})
    )
    return Tokenizer.from_dir(Path(folder))


@dataclass
class Served:
    llm: FakeLLM
    engine: TrtllmEngine
    state: BackendState
    tokenizer: Tokenizer


@pytest.fixture
async def served(tokenizer: Tokenizer) -> AsyncIterator[Served]:
    llm = FakeLLM(vocab=tokenizer.vocab_size)
    limits = StatsLimits(max_num_seqs=2, max_waiting=1, max_model_len=MAX_MODEL_LEN)
    engine = TrtllmEngine(llm, sampling_params, limits, stats_poll_s=0.01)
    metrics = EngineMetrics(MODEL, lambda: engine.stats)
    state = BackendState((MODEL,))
    state.service = GenerationService(
        engine, tokenizer, max_model_len=MAX_MODEL_LEN, metrics=metrics
    )
    state.ready = True
    engine.start()
    yield Served(llm, engine, state, tokenizer)
    await engine.stop()


@pytest.fixture
async def client(served: Served) -> AsyncIterator[httpx.AsyncClient]:
    """Real HTTP to the app under uvicorn, on the test's own event loop."""
    port = free_port()
    config = uvicorn.Config(
        create_app(served.state), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        assert not task.done(), "the server did not start"
        await asyncio.sleep(0.01)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
        yield c
    server.should_exit = True
    await task


def expected_tokens(tok: Tokenizer, content: str, max_tokens: int) -> Iterator[int]:
    """What the fake model generates for a one-message chat."""
    seq = tok.apply_chat_template([{"role": "user", "content": content}])
    for _ in range(max_tokens):
        seq.append(next_token(seq, tok.vocab_size))
        yield seq[-1]
        if seq[-1] in tok.eos_token_ids:
            return


def body(content: str, **fields: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


async def test_chat_completion_text_usage_and_sampling_arguments(
    served: Served, client: httpx.AsyncClient
) -> None:
    tok = served.tokenizer
    tokens = list(expected_tokens(tok, "hello", 20))
    printable = tokens[:-1] if tokens[-1] in tok.eos_token_ids else tokens
    response = await client.post(CHAT, json=body("hello", max_tokens=20, seed=5, temperature=0.7))
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["choices"][0]["message"]["content"] == tok.decode(printable)
    prompt_len = len(tok.apply_chat_template([{"role": "user", "content": "hello"}]))
    assert data["usage"] == {
        "prompt_tokens": prompt_len,
        "completion_tokens": len(tokens),
        "total_tokens": prompt_len + len(tokens),
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    inputs, params = served.llm.submitted[-1]
    assert inputs == {
        "prompt_token_ids": tok.apply_chat_template([{"role": "user", "content": "hello"}])
    }
    assert vars(params) == {
        "max_tokens": 20,
        "n": 1,
        "seed": 5,
        "stop_token_ids": sorted(tok.eos_token_ids),
        "ignore_eos": False,
        "detokenize": False,
        "include_stop_str_in_output": True,
        "temperature": 0.7,
        "top_p": 1.0,
    }


async def test_stream_concatenates_to_the_whole_response(client: httpx.AsyncClient) -> None:
    whole = (await client.post(CHAT, json=body("the cat", max_tokens=24, temperature=0))).json()
    text, usage = "", None
    stream_body = body(
        "the cat", max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    async with client.stream("POST", CHAT, json=stream_body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk["choices"]:
                text += choice["delta"].get("content") or ""
            usage = chunk.get("usage") or usage
    assert text == whole["choices"][0]["message"]["content"]
    assert usage == whole["usage"]


async def test_stop_string_cuts_the_text_and_reaches_tensorrt_llm(
    served: Served, client: httpx.AsyncClient
) -> None:
    full = (await client.post(CHAT, json=body("hello", max_tokens=30, temperature=0))).json()
    text = full["choices"][0]["message"]["content"]
    stop = next(text[i : i + 2] for i in range(4, len(text) - 2) if text[i : i + 2].strip())
    cut = (
        await client.post(CHAT, json=body("hello", max_tokens=30, temperature=0, stop=[stop]))
    ).json()
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["message"]["content"] == text[: text.index(stop)]
    assert vars(served.llm.submitted[-1][1])["stop"] == [stop]
    # Cutting at the stop string ended the request early in TensorRT-LLM too.
    assert served.llm.results[-1].aborted or served.llm.results[-1].finished


async def test_shared_prefix_reports_cached_tokens(client: httpx.AsyncClient) -> None:
    system = "the cat sat on the mat " * 12
    usages = []
    for question in ("hello", "world"):
        payload = {
            "model": MODEL,
            "max_tokens": 2,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": question},
            ],
        }
        usages.append((await client.post(CHAT, json=payload)).json()["usage"])
    assert usages[0]["prompt_tokens_details"]["cached_tokens"] == 0
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] >= 32


async def test_stats_and_metrics_keep_their_shape(client: httpx.AsyncClient) -> None:
    await client.post(CHAT, json=body("hello", max_tokens=4))
    await asyncio.sleep(0.05)
    stats = (await client.get("/stats")).json()
    assert set(stats) == {
        "num_running",
        "num_waiting",
        "queued_prompt_tokens",
        "active_decode_tokens",
        "kv_usage",
        "num_free_blocks",
        "num_total_blocks",
        "prefix_cache_queries",
        "prefix_cache_hits",
        "num_preemptions_total",
        "max_num_seqs",
        "max_waiting",
        "max_model_len",
    }
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert stats["num_total_blocks"] == stats["num_free_blocks"] == 100
    assert (stats["max_num_seqs"], stats["max_waiting"], stats["max_model_len"]) == (2, 1, 256)
    assert stats["prefix_cache_queries"] > 0
    metrics = (await client.get("/metrics")).text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:e2e_request_latency_seconds",
        "vllm:generation_tokens_total",
        "tollgate:queued_prompt_tokens",
    ):
        assert name in metrics, name


async def test_busy_stats_while_a_request_streams(
    served: Served, client: httpx.AsyncClient
) -> None:
    served.llm.token_delay_s = 0.01
    payload = body("hello", max_tokens=200, ignore_eos=True, stream=True)
    async with client.stream("POST", CHAT, json=payload) as response:
        lines = response.aiter_lines()
        for _ in range(6):
            await anext(lines)
        await asyncio.sleep(0.05)
        busy = (await client.get("/stats")).json()
    assert busy["num_running"] == 1
    assert 0 < busy["kv_usage"] < 1
    assert 0 < busy["active_decode_tokens"] <= 200


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"logprobs": True}, "logprobs"), ({"n": 2}, "n"), ({"top_logprobs": 2}, "top_logprobs")],
)
async def test_unsupported_fields_are_400s(
    client: httpx.AsyncClient, fields: dict[str, object], param: str
) -> None:
    response = await client.post(CHAT, json=body("hello", **fields))
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


async def test_too_long_is_a_400_whoever_notices(served: Served, client: httpx.AsyncClient) -> None:
    response = await client.post(CHAT, json=body("hello", max_tokens=1000))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    served.llm.refuse_prompts_longer_than = 3
    response = await client.post(CHAT, json=body("hello", max_tokens=4))
    assert response.status_code == 400
    assert "exceeds" in response.json()["error"]["message"]


async def test_a_full_backend_answers_429(served: Served, client: httpx.AsyncClient) -> None:
    served.llm.token_delay_s = 0.01
    long = body("hello", max_tokens=200, ignore_eos=True)
    tasks = [asyncio.ensure_future(client.post(CHAT, json=long)) for _ in range(3)]
    try:
        for _ in range(1000):
            if len(served.llm.active()) == 3:
                break
            await asyncio.sleep(0.005)
        response = await client.post(CHAT, json=body("hello", max_tokens=2))
        assert response.status_code == 429
        assert response.headers["retry-after"] == "1"
    finally:
        served.llm.token_delay_s = 0.0
        await asyncio.gather(*tasks)


async def test_a_dead_llm_fails_health(served: Served, client: httpx.AsyncClient) -> None:
    served.llm.shut_down = True
    response = await client.post(CHAT, json=body("hello", max_tokens=2))
    assert response.status_code == 500
    assert (await client.get("/health")).status_code == 503
    assert (await client.get("/ready")).status_code == 503


async def test_client_disconnect_aborts_in_tensorrt_llm(
    served: Served, client: httpx.AsyncClient
) -> None:
    served.llm.token_delay_s = 0.01
    payload = body("hello", max_tokens=200, ignore_eos=True, stream=True)
    async with client.stream("POST", CHAT, json=payload) as response:
        assert response.status_code == 200
        lines = response.aiter_lines()
        for _ in range(6):
            await anext(lines)
    for _ in range(200):
        if served.llm.aborted and served.engine.stats.num_running == 0:
            break
        await asyncio.sleep(0.01)
    assert served.llm.aborted == [served.llm.results[-1].request_id]
    assert served.engine.stats.num_running == 0
    assert len(served.llm.results[-1].outputs[0].token_ids) < 200
