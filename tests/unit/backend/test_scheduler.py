"""Scheduler and engine core driven by a deterministic fake executor.

`SlotExecutor` stores every computed token in the KV slot its block table
points at and samples from what it reads back through the table. A wrong block
table, a block reused while still held, or a bad prefix hit therefore changes
the generated tokens, and the tests compare them to `reference_output`.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from backend.config import SchedulerConfig
from backend.engine.core import EngineCore
from backend.engine.request import Request, RequestStatus, SamplingParams
from backend.kv_cache.manager import KVCacheManager
from backend.scheduler.errors import QueueFullError
from backend.scheduler.output import ModelOutput, SchedulerOutput
from backend.scheduler.scheduler import Scheduler
from backend.scheduler.updates import RequestUpdate

VOCAB = 50


def next_token(tokens: Sequence[int]) -> int:
    """A deterministic 'model': the next token is a hash of the whole sequence."""
    h = 7
    for t in tokens:
        h = (h * 1_000_003 + t + 1) % 2_305_843_009_213_693_951
    return h % VOCAB


def reference_output(
    prompt: Sequence[int], sampling: SamplingParams, max_model_len: int
) -> tuple[list[int], str]:
    """What an engine with unlimited resources must produce."""
    tokens = list(prompt)
    out: list[int] = []
    while True:
        t = next_token(tokens)
        tokens.append(t)
        out.append(t)
        if t in sampling.stop_token_ids:
            return out, "stop"
        if len(out) >= sampling.max_tokens or len(tokens) >= max_model_len:
            return out, "length"


class SlotExecutor:
    """Writes chunk tokens into KV slots and samples `next_token` of what it reads back."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.slots: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.num_executed = 0
        self.released: list[str] = []

    def execute(self, scheduler_output: SchedulerOutput) -> ModelOutput:
        self.num_executed += 1
        bs = self.block_size
        sampled: dict[str, int] = {}
        for chunk in scheduler_output.chunks:
            end = chunk.start_pos + len(chunk.token_ids)
            assert len(chunk.block_ids) * bs >= end, "block table too short"
            for i, token in enumerate(chunk.token_ids):
                pos = chunk.start_pos + i
                self.slots[chunk.block_ids[pos // bs]][pos % bs] = token
            if chunk.sample:
                seq = [self.slots[chunk.block_ids[p // bs]][p % bs] for p in range(end)]
                assert None not in seq, "read a slot that was never written"
                sampled[chunk.request_id] = next_token([t for t in seq if t is not None])
        return ModelOutput(sampled=sampled)

    def release(self, request_id: str) -> None:
        self.released.append(request_id)


def make_core(
    num_blocks: int = 64,
    block_size: int = 4,
    *,
    max_num_seqs: int = 32,
    max_num_batched_tokens: int = 512,
    max_waiting: int = 256,
    max_model_len: int = 2048,
    enable_prefix_caching: bool = True,
) -> tuple[EngineCore, Scheduler, SlotExecutor]:
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_waiting=max_waiting,
        max_model_len=max_model_len,
    )
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
    scheduler = Scheduler(config, kv)
    executor = SlotExecutor(num_blocks, block_size)
    return EngineCore(scheduler, executor), scheduler, executor


def make_request(
    request_id: str,
    prompt: Sequence[int],
    max_tokens: int = 8,
    *,
    priority: int = 0,
    arrival_time: float = 0.0,
    stop_token_ids: frozenset[int] = frozenset(),
) -> Request:
    return Request(
        request_id=request_id,
        prompt_token_ids=list(prompt),
        sampling=SamplingParams(max_tokens=max_tokens, stop_token_ids=stop_token_ids),
        priority=priority,
        arrival_time=arrival_time,
    )


def run_to_completion(core: EngineCore, max_steps: int = 10_000) -> dict[str, list[RequestUpdate]]:
    """Step until idle; returns every request's updates in order."""
    updates: dict[str, list[RequestUpdate]] = {}
    for _ in range(max_steps):
        if not core.has_unfinished():
            return updates
        for update in core.step():
            updates.setdefault(update.request_id, []).append(update)
    raise AssertionError("engine did not finish")


def tokens_of(updates: list[RequestUpdate]) -> list[int]:
    return [t for u in updates for t in u.new_token_ids]


def step_once(
    scheduler: Scheduler, executor: SlotExecutor
) -> tuple[SchedulerOutput, list[RequestUpdate]]:
    out = scheduler.schedule()
    model_output = executor.execute(out) if out.chunks else ModelOutput()
    return out, scheduler.update_from_output(out, model_output)


# --- token budget and chunked prefill ------------------------------------


def test_token_budget_chunks_prefills_and_admits_in_order() -> None:
    _, sched, ex = make_core(max_num_batched_tokens=16)
    for i, rid in enumerate("abc"):
        sched.add_request(make_request(rid, range(10 * i, 10 * i + 10), arrival_time=i))
    out, updates = step_once(sched, ex)
    assert [(c.request_id, c.start_pos, len(c.token_ids)) for c in out.chunks] == [
        ("a", 0, 10),
        ("b", 0, 6),
    ]
    assert [c.sample for c in out.chunks] == [True, False]
    assert out.num_tokens == 16
    assert [u.request_id for u in updates] == ["a"]
    assert sched.stats().num_waiting == 1

    out, _ = step_once(sched, ex)
    assert [(c.request_id, c.start_pos, len(c.token_ids)) for c in out.chunks] == [
        ("a", 10, 1),
        ("b", 6, 4),
        ("c", 0, 10),
    ]
    assert out.chunks[0].token_ids == sched.requests["a"].output_token_ids[:1]
    assert out.chunks[0].num_generated == 1
    assert out.num_tokens <= 16


def test_long_prefill_never_stalls_running_decodes() -> None:
    _, sched, ex = make_core(max_num_batched_tokens=8)
    for i in range(4):
        sched.add_request(make_request(f"d{i}", [i, i + 1], max_tokens=30, arrival_time=i))
    step_once(sched, ex)  # all four prefill in one step
    sched.add_request(make_request("long", range(40), max_tokens=2, arrival_time=10))
    prefill_sizes = []
    while sched.requests["long"].num_computed_tokens < 40:
        out, _ = step_once(sched, ex)
        sizes = {c.request_id: len(c.token_ids) for c in out.chunks}
        assert all(sizes[f"d{i}"] == 1 for i in range(4)), sizes
        prefill_sizes.append(sizes.get("long", 0))
        assert out.num_tokens <= 8
    assert prefill_sizes == [4] * 10


def test_decodes_go_before_prefills_whatever_the_running_order() -> None:
    _, sched, ex = make_core(max_num_batched_tokens=12)
    sched.add_request(make_request("dec", [1, 2], max_tokens=10, arrival_time=0))
    sched.add_request(make_request("pre", range(30), arrival_time=1))
    step_once(sched, ex)
    # Put the prefill first in the running list: it must still not starve the decode.
    sched.running.sort(key=lambda r: r.request_id != "pre")
    assert [r.request_id for r in sched.running] == ["pre", "dec"]
    out, _ = step_once(sched, ex)
    sizes = {c.request_id: len(c.token_ids) for c in out.chunks}
    assert sizes == {"dec": 1, "pre": 11}


# --- admission ------------------------------------------------------------


def test_admission_by_priority_then_arrival() -> None:
    _, sched, ex = make_core(max_num_seqs=2)
    sched.add_request(make_request("late-low", [1, 2], max_tokens=2, priority=1, arrival_time=1))
    sched.add_request(make_request("early-low", [1, 3], max_tokens=2, priority=1, arrival_time=0))
    sched.add_request(make_request("late-high", [1, 4], max_tokens=2, priority=0, arrival_time=3))
    sched.add_request(make_request("early-high", [1, 5], max_tokens=2, priority=0, arrival_time=2))
    out, _ = step_once(sched, ex)
    assert [c.request_id for c in out.chunks] == ["early-high", "late-high"]
    assert sched.stats().num_running == 2
    assert sched.stats().num_waiting == 2
    step_once(sched, ex)  # both finish (max_tokens=2)
    out, _ = step_once(sched, ex)
    assert [c.request_id for c in out.chunks] == ["early-low", "late-low"]


def test_max_num_seqs_caps_running_requests() -> None:
    _, sched, ex = make_core(max_num_seqs=2)
    for i in range(5):
        sched.add_request(make_request(f"r{i}", [i, 1, 2], max_tokens=3, arrival_time=i))
    seen_running = []
    while sched.has_unfinished():
        step_once(sched, ex)
        seen_running.append(len(sched.running))
    assert max(seen_running) == 2
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


def test_queue_full_raises_until_requests_are_admitted() -> None:
    _, sched, ex = make_core(max_waiting=2)
    sched.add_request(make_request("a", [1, 2]))
    sched.add_request(make_request("b", [1, 2]))
    with pytest.raises(QueueFullError):
        sched.add_request(make_request("c", [1, 2]))
    assert "c" not in sched.requests
    step_once(sched, ex)  # a and b are admitted, the queue empties
    sched.add_request(make_request("c", [1, 2]))
    assert sched.stats().num_waiting == 1


def test_waiting_request_that_does_not_fit_waits_without_preempting() -> None:
    _, sched, ex = make_core(num_blocks=4, block_size=2)
    sched.add_request(make_request("a", range(5), max_tokens=3, arrival_time=0))
    step_once(sched, ex)
    sched.add_request(make_request("b", range(10, 14), max_tokens=1, arrival_time=1))
    out, _ = step_once(sched, ex)
    assert [c.request_id for c in out.chunks] == ["a"]
    assert out.preempted_ids == []
    assert sched.requests["b"].status is RequestStatus.WAITING
    while "a" in sched.requests:
        step_once(sched, ex)
    out, _ = step_once(sched, ex)
    assert [c.request_id for c in out.chunks] == ["b"]


def test_invalid_requests_are_refused() -> None:
    _, sched, _ = make_core(num_blocks=4, block_size=2, max_model_len=20)
    with pytest.raises(ValueError, match="empty"):
        sched.add_request(make_request("e", []))
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add_request(make_request("long", range(20)))
    with pytest.raises(ValueError, match="KV blocks"):
        sched.add_request(make_request("big", range(8), max_tokens=2))  # 9 tokens -> 5 blocks
    sched.add_request(make_request("ok", range(8), max_tokens=1))  # 8 computed -> 4 blocks
    with pytest.raises(ValueError, match="already"):
        sched.add_request(make_request("ok", [1]))
    assert list(sched.requests) == ["ok"]


# --- preemption ----------------------------------------------------------


def test_preemption_takes_the_latest_arrival_and_keeps_its_tokens() -> None:
    _, sched, ex = make_core(num_blocks=4, block_size=2)
    sched.add_request(make_request("a", [1, 2, 3], max_tokens=4, arrival_time=0))
    sched.add_request(make_request("b", [4, 5, 6], max_tokens=4, arrival_time=1))
    step_once(sched, ex)
    step_once(sched, ex)
    b = sched.requests["b"]
    assert sched.kv.num_free_blocks == 0
    b_tokens = list(b.output_token_ids)
    assert len(b_tokens) == 2

    out, _ = step_once(sched, ex)  # a needs a 3rd block: b is preempted
    assert out.preempted_ids == ["b"]
    assert [c.request_id for c in out.chunks] == ["a"]
    assert b.status is RequestStatus.WAITING
    assert b.num_computed_tokens == 0
    assert b.output_token_ids == b_tokens
    assert b.num_preemptions == 1
    assert sched.kv.block_ids("b") == []
    assert sched.stats().num_preemptions_total == 1

    while sched.has_unfinished():
        step_once(sched, ex)
    assert b.output_token_ids == reference_output([4, 5, 6], b.sampling, 2048)[0]


def test_preemption_prefers_lower_priority_over_arrival() -> None:
    _, sched, ex = make_core(num_blocks=4, block_size=2)
    sched.add_request(make_request("low", [1, 2, 3], max_tokens=4, priority=1, arrival_time=0))
    sched.add_request(make_request("high", [4, 5, 6], max_tokens=4, priority=0, arrival_time=1))
    step_once(sched, ex)
    step_once(sched, ex)
    out, _ = step_once(sched, ex)
    assert out.preempted_ids == ["low"]
    assert [c.request_id for c in out.chunks] == ["high"]


def test_a_request_can_preempt_itself() -> None:
    _, sched, ex = make_core(num_blocks=4, block_size=2)
    sched.add_request(make_request("a", [1, 2, 3, 4], max_tokens=3, arrival_time=0))
    sched.add_request(make_request("b", [5, 6, 7, 8], max_tokens=3, arrival_time=1))
    step_once(sched, ex)  # both hold 2 full blocks; each next token needs a 3rd block
    out, _ = step_once(sched, ex)
    # a needs a block: b (latest) goes, a gets one; b was not scheduled yet.
    assert out.preempted_ids == ["b"]
    assert [c.request_id for c in out.chunks] == ["a"]

    _, sched2, ex2 = make_core(num_blocks=4, block_size=2)
    sched2.add_request(make_request("a", [1, 2, 3], max_tokens=3, arrival_time=0))
    sched2.add_request(make_request("b", [5, 6, 7, 8], max_tokens=3, arrival_time=1))
    step_once(sched2, ex2)
    out, _ = step_once(sched2, ex2)
    # a's decode fits; b, the latest, needs a block and can only preempt itself.
    assert out.preempted_ids == ["b"]
    assert [c.request_id for c in out.chunks] == ["a"]
    assert sched2.requests["b"].status is RequestStatus.WAITING


def test_an_already_scheduled_victim_loses_its_chunk() -> None:
    _, sched, ex = make_core(num_blocks=6, block_size=2, max_num_batched_tokens=4)
    b = make_request("b", [1, 2], max_tokens=10, arrival_time=5)
    sched.add_request(b)
    step_once(sched, ex)
    step_once(sched, ex)
    # a arrived "earlier" (it outranks b) and prefills in chunks after b's decode.
    a = make_request("a", range(20, 31), max_tokens=2, arrival_time=0)
    sched.add_request(a)
    out, _ = step_once(sched, ex)
    assert [(c.request_id, len(c.token_ids)) for c in out.chunks] == [("b", 1), ("a", 3)]
    step_once(sched, ex)
    assert sched.kv.num_free_blocks == 0
    out, _ = step_once(sched, ex)
    # b's decode fit and was scheduled first, then a ran out of blocks and b was
    # the victim: b must not keep a chunk pointing at blocks it no longer holds.
    assert out.preempted_ids == ["b"]
    assert [(c.request_id, len(c.token_ids)) for c in out.chunks] == [("a", 3)]
    while sched.has_unfinished():
        step_once(sched, ex)
    assert sched.kv.num_free_blocks == 6
    assert a.output_token_ids == reference_output(a.prompt_token_ids, a.sampling, 2048)[0]
    assert b.output_token_ids == reference_output([1, 2], b.sampling, 2048)[0]


def test_every_request_finishes_with_the_same_tokens_under_memory_pressure() -> None:
    prompts = {
        f"r{i}": [(i * 7 + j * 3) % VOCAB for j in range(3 + (i * 5) % 17)] for i in range(12)
    }
    max_tokens = {rid: 4 + (i * 3) % 13 for i, rid in enumerate(prompts)}

    def run(num_blocks: int, budget: int) -> tuple[dict[str, list[int]], int]:
        core, sched, _ = make_core(
            num_blocks=num_blocks, block_size=4, max_num_batched_tokens=budget
        )
        for i, (rid, prompt) in enumerate(prompts.items()):
            core.add_request(make_request(rid, prompt, max_tokens[rid], arrival_time=i))
        updates = run_to_completion(core)
        assert sched.kv.num_free_blocks == num_blocks
        return {rid: tokens_of(u) for rid, u in updates.items()}, sched.num_preemptions_total

    unconstrained, no_preemptions = run(num_blocks=256, budget=1024)
    constrained, preemptions = run(num_blocks=10, budget=7)
    assert no_preemptions == 0
    assert preemptions > 0
    assert constrained == unconstrained
    for rid, prompt in prompts.items():
        sampling = SamplingParams(max_tokens=max_tokens[rid])
        assert unconstrained[rid] == reference_output(prompt, sampling, 2048)[0]


# --- finishing ----------------------------------------------------------


def test_stop_token_is_kept_in_the_output_and_flagged() -> None:
    prompt = [3, 1, 4, 1, 5]
    free_run, _ = reference_output(prompt, SamplingParams(max_tokens=20), 2048)
    stop = free_run[3]
    k = free_run.index(stop)
    core, sched, ex = make_core()
    request = make_request("s", prompt, max_tokens=20, stop_token_ids=frozenset({stop}))
    core.add_request(request)
    updates = run_to_completion(core)["s"]
    assert tokens_of(updates) == free_run[: k + 1]
    assert request.output_token_ids == free_run[: k + 1]
    last = updates[-1]
    assert last.finished and last.finish_reason == "stop"
    assert last.stop_token_id == stop
    assert last.printable_token_ids == []
    assert all(u.stop_token_id is None and not u.finished for u in updates[:-1])
    assert request.status is RequestStatus.FINISHED_STOPPED
    assert ex.released == ["s"]
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


def test_max_tokens_and_max_model_len_finish_with_length() -> None:
    core, sched, _ = make_core(max_model_len=10)
    by_tokens = make_request("t", [1, 2, 3], max_tokens=2)
    by_len = make_request("m", [1, 2, 3, 4, 5, 6], max_tokens=100)
    core.add_request(by_tokens)
    core.add_request(by_len)
    updates = run_to_completion(core)
    assert len(by_tokens.output_token_ids) == 2
    assert updates["t"][-1].finish_reason == "length"
    assert by_len.num_tokens == 10
    assert len(tokens_of(updates["m"])) == 4
    assert updates["m"][-1].finish_reason == "length"
    assert by_len.status is RequestStatus.FINISHED_LENGTH
    assert [u.finished for u in updates["m"]] == [False, False, False, True]
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


# --- aborts -------------------------------------------------------------


def test_abort_frees_blocks_at_once_and_reports_on_the_next_step() -> None:
    core, sched, ex = make_core(num_blocks=16)
    core.add_request(make_request("a", range(10), max_tokens=50))
    core.add_request(make_request("w", range(10), max_tokens=50))
    core.step()
    assert sched.kv.num_free_blocks == 16 - 3 - 3
    core.abort_request("a")
    assert sched.kv.num_free_blocks == 16 - 3
    assert sched.kv.block_ids("a") == []
    assert "a" not in sched.requests
    assert ex.released == []
    core.abort_request("nope")  # unknown ids are ignored
    updates = core.step()
    aborted = [u for u in updates if u.request_id == "a"]
    assert len(aborted) == 1
    assert aborted[0].finished and aborted[0].finish_reason == "abort"
    assert aborted[0].new_token_ids == []
    assert ex.released == ["a"]
    assert not [u for u in core.step() if u.request_id == "a"]
    assert ex.released == ["a"]


def test_abort_of_a_waiting_request() -> None:
    core, sched, ex = make_core(max_num_seqs=1)
    core.add_request(make_request("a", [1, 2], max_tokens=3))
    core.add_request(make_request("w", [1, 2], max_tokens=3))
    core.step()
    assert sched.requests["w"].status is RequestStatus.WAITING
    core.abort_request("w")
    assert sched.stats().num_waiting == 0
    updates = run_to_completion(core)
    assert [u.finish_reason for u in updates["w"]] == ["abort"]
    assert updates["w"][0].num_cached_tokens == 0
    assert sorted(ex.released) == ["a", "w"]


def test_chunk_of_a_request_aborted_before_update_is_ignored() -> None:
    _, sched, ex = make_core()
    sched.add_request(make_request("a", [1, 2, 3]))
    sched.add_request(make_request("b", [4, 5, 6]))
    out = sched.schedule()
    model_output = ex.execute(out)
    aborted = sched.abort_request("a")
    assert aborted is not None and aborted.status is RequestStatus.FINISHED_ABORTED
    updates = sched.update_from_output(out, model_output)
    assert [u.request_id for u in updates] == ["b"]
    assert aborted.output_token_ids == []
    assert sched.kv.block_ids("a") == []
    # Applying the same output twice does nothing either.
    assert sched.update_from_output(out, model_output) == []


def test_missing_sampled_token_is_an_executor_error() -> None:
    _, sched, _ = make_core()
    sched.add_request(make_request("a", [1, 2, 3]))
    out = sched.schedule()
    with pytest.raises(RuntimeError, match="no token"):
        sched.update_from_output(out, ModelOutput())


# --- engine core, prefix cache and stats ---------------------------------


def test_engine_skips_execute_when_nothing_is_scheduled() -> None:
    core, _, ex = make_core()
    assert core.step() == []
    assert ex.num_executed == 0
    assert not core.has_unfinished()


def test_prefix_cache_hit_is_reported_and_gives_the_same_tokens() -> None:
    core, sched, ex = make_core(block_size=4)
    prompt = list(range(1, 14))
    first = make_request("first", prompt, max_tokens=3)
    core.add_request(first)
    run_to_completion(core)
    second = make_request("second", prompt, max_tokens=3)
    core.add_request(second)
    out = sched.schedule()
    assert out.chunks[0].start_pos == 12
    assert out.chunks[0].token_ids == [13]
    updates = sched.update_from_output(out, ex.execute(out))
    assert second.num_cached_tokens == 12
    assert updates[0].num_cached_tokens == 12
    assert updates[0].num_prompt_tokens == 13
    run_to_completion(core)
    assert second.output_token_ids == first.output_token_ids
    stats = sched.stats()
    assert stats.prefix_cache_queries == 26
    assert stats.prefix_cache_hits == 12


def test_stats_snapshot() -> None:
    _, sched, ex = make_core(
        num_blocks=32, block_size=4, max_num_seqs=2, max_num_batched_tokens=8, max_waiting=9
    )
    sched.add_request(make_request("a", range(6), max_tokens=5, arrival_time=0))
    sched.add_request(make_request("b", range(10, 20), max_tokens=7, arrival_time=1))
    sched.add_request(make_request("c", range(20, 23), max_tokens=2, arrival_time=2))
    step_once(sched, ex)  # a: 6 tokens (+1 sampled), b: 2 of 10
    stats = sched.stats()
    assert stats.num_running == 2
    assert stats.num_waiting == 1
    assert stats.queued_prompt_tokens == (10 - 2) + 3
    assert stats.active_decode_tokens == (5 - 1) + 7
    assert stats.num_total_blocks == 32
    assert stats.num_free_blocks == 32 - 2 - 1
    assert stats.kv_usage == pytest.approx(3 / 32)
    assert stats.max_num_seqs == 2
    assert stats.max_waiting == 9
    assert stats.num_preemptions_total == 0
