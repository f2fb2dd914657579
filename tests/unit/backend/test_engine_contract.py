"""One contract for every `Engine`: the torch engine and the `tensorrt_llm` engine.

Both run the same deterministic fake model (the next token is a hash of the
sequence): the torch engine through its real scheduler, KV cache and engine
thread with a fake executor, the `tensorrt_llm` engine against a stand-in for
`tensorrt_llm.LLM` (tests/support/fake_trtllm.py). So both must also produce
exactly the same tokens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

import pytest

from backend.config import SchedulerConfig
from backend.engine.async_engine import AsyncEngine
from backend.engine.core import EngineCore
from backend.engine.protocol import Engine
from backend.engine.request import Request, SamplingParams
from backend.engine.trtllm.engine import TrtllmEngine
from backend.engine.trtllm.stats import StatsLimits
from backend.kv_cache.manager import KVCacheManager
from backend.scheduler.errors import QueueFullError
from backend.scheduler.output import ModelOutput, SchedulerOutput
from backend.scheduler.scheduler import Scheduler
from backend.scheduler.stats import SchedulerStats
from backend.scheduler.updates import RequestUpdate
from tests.support.fake_trtllm import FakeLLM, next_token, sampling_params

VOCAB = 50
STEP_S = 0.002
MAX_NUM_SEQS = 2
MAX_WAITING = 1
MAX_MODEL_LEN = 4096
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


class HashExecutor:
    """Runs the fake model for the torch engine, `STEP_S` per step."""

    def __init__(self) -> None:
        self.seqs: dict[str, list[int]] = {}

    def execute(self, scheduler_output: SchedulerOutput) -> ModelOutput:
        time.sleep(STEP_S)
        sampled: dict[str, int] = {}
        for chunk in scheduler_output.chunks:
            seq = self.seqs.setdefault(chunk.request_id, [])
            del seq[chunk.start_pos :]
            seq.extend(chunk.token_ids)
            if chunk.sample:
                sampled[chunk.request_id] = next_token(seq, VOCAB)
        return ModelOutput(sampled=sampled)

    def release(self, request_id: str) -> None:
        self.seqs.pop(request_id, None)


def torch_engine() -> AsyncEngine:
    config = SchedulerConfig(
        max_num_seqs=MAX_NUM_SEQS,
        max_num_batched_tokens=256,
        max_waiting=MAX_WAITING,
        max_model_len=MAX_MODEL_LEN,
    )
    scheduler = Scheduler(config, KVCacheManager(1024, 16, enable_prefix_caching=True))
    return AsyncEngine(EngineCore(scheduler, HashExecutor()))


def trtllm_engine() -> TrtllmEngine:
    limits = StatsLimits(
        max_num_seqs=MAX_NUM_SEQS, max_waiting=MAX_WAITING, max_model_len=MAX_MODEL_LEN
    )
    llm = FakeLLM(vocab=VOCAB, token_delay_s=STEP_S)
    return TrtllmEngine(llm, sampling_params, limits, stats_poll_s=0.01)


@pytest.fixture(params=["torch", "tensorrt_llm"])
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    built: Engine = torch_engine() if request.param == "torch" else trtllm_engine()
    built.start()
    try:
        yield built
    finally:
        await built.stop()


def make_request(
    request_id: str,
    max_tokens: int = 12,
    stop_token_ids: frozenset[int] = frozenset(),
    prompt: Sequence[int] = PROMPT,
) -> Request:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0, stop_token_ids=stop_token_ids)
    return Request(request_id=request_id, prompt_token_ids=list(prompt), sampling=sampling)


def reference(prompt: Sequence[int], max_tokens: int) -> list[int]:
    tokens, out = list(prompt), []
    for _ in range(max_tokens):
        tokens.append(next_token(tokens, VOCAB))
        out.append(tokens[-1])
    return out


async def collect(engine: Engine, request: Request) -> list[RequestUpdate]:
    return [update async for update in engine.generate(request)]


async def idle(engine: Engine, timeout_s: float = 5.0) -> SchedulerStats:
    """The engine's stats once nothing runs or waits."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = engine.stats
        if stats.num_running == 0 and stats.num_waiting == 0:
            return stats
        assert time.monotonic() < deadline, f"engine never went idle: {stats}"
        await asyncio.sleep(0.01)


async def test_generates_the_model_tokens_up_to_max_tokens(engine: Engine) -> None:
    updates = await collect(engine, make_request("a", max_tokens=12))
    tokens = [t for u in updates for t in u.new_token_ids]
    assert tokens == reference(PROMPT, 12)
    assert [u.finished for u in updates].count(True) == 1 and updates[-1].finished
    assert updates[-1].finish_reason == "length"
    assert all(u.request_id == "a" and u.num_prompt_tokens == len(PROMPT) for u in updates)
    stats = await idle(engine)
    assert stats.kv_usage == 0.0
    assert stats.max_num_seqs == MAX_NUM_SEQS and stats.max_waiting == MAX_WAITING


async def test_a_stop_token_ends_with_stop_and_stays_out_of_the_text(engine: Engine) -> None:
    expected = reference(PROMPT, 12)
    stop = expected[4]
    first = expected.index(stop)
    updates = await collect(engine, make_request("b", stop_token_ids=frozenset({stop})))
    tokens = [t for u in updates for t in u.new_token_ids]
    assert tokens == expected[: first + 1]
    assert updates[-1].finish_reason == "stop"
    assert updates[-1].stop_token_id == stop
    assert [t for u in updates for t in u.printable_token_ids] == expected[:first]


async def test_leaving_early_aborts_and_frees_the_request(engine: Engine) -> None:
    gen = engine.generate(make_request("c", max_tokens=2000))
    async for _ in gen:
        break
    await gen.aclose()
    stats = await idle(engine)
    assert stats.num_running == stats.num_waiting == 0
    # ...and the engine still serves.
    assert len(await collect(engine, make_request("c2", max_tokens=3))) >= 1


async def test_abort_by_id_ends_the_stream(engine: Engine) -> None:
    gen = engine.generate(make_request("d", max_tokens=2000))
    first = await anext(gen)
    assert not first.finished
    engine.abort("d")
    rest = [u async for u in gen]
    assert rest and rest[-1].finished and rest[-1].finish_reason == "abort"
    assert sum(len(u.new_token_ids) for u in rest) < 2000
    engine.abort("no-such-request")
    await idle(engine)


async def test_one_request_past_running_and_waiting_is_refused(engine: Engine) -> None:
    gens = [engine.generate(make_request(f"q{i}", max_tokens=2000)) for i in range(3)]
    pending: list[asyncio.Task[RequestUpdate]] = []
    try:
        for gen in gens[:MAX_NUM_SEQS]:
            await anext(gen)  # running
        pending.append(asyncio.ensure_future(anext(gens[MAX_NUM_SEQS])))  # waiting or running
        await asyncio.sleep(0.05)
        extra = engine.generate(make_request("q-extra", max_tokens=5))
        with pytest.raises(QueueFullError):
            await anext(extra)
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for gen in gens:
            await gen.aclose()
    await idle(engine)


async def test_an_id_already_in_flight_is_refused(engine: Engine) -> None:
    gen = engine.generate(make_request("dup", max_tokens=2000))
    try:
        await anext(gen)
        with pytest.raises(ValueError, match="dup"):
            await anext(engine.generate(make_request("dup", max_tokens=5)))
    finally:
        await gen.aclose()
    await idle(engine)


async def test_concurrent_requests_each_get_their_own_tokens(engine: Engine) -> None:
    first = engine.generate(make_request("p0", max_tokens=9, prompt=[7, 7, 7]))
    head = await anext(first)  # running, so the next one is admitted at once too
    rest, second = await asyncio.gather(
        collect_rest(first), collect(engine, make_request("p1", max_tokens=9, prompt=[1, 2, 3]))
    )
    assert [t for u in [head, *rest] for t in u.new_token_ids] == reference([7, 7, 7], 9)
    assert [t for u in second for t in u.new_token_ids] == reference([1, 2, 3], 9)


async def collect_rest(gen: AsyncIterator[RequestUpdate]) -> list[RequestUpdate]:
    return [update async for update in gen]


async def test_lifecycle() -> None:
    for build in (torch_engine, trtllm_engine):
        engine: Engine = build()
        assert not engine.healthy
        assert isinstance(engine.stats, SchedulerStats)
        engine.start()
        assert engine.healthy
        await engine.stop()
        assert not engine.healthy
