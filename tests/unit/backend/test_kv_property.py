"""Randomized runs of the engine core against the block-pool invariants.

Requests with shared prefixes, random lengths, priorities, stop tokens and
cancellations run through a small KV pool so that prefix hits, evictions and
preemptions all happen. After every step the bookkeeping must be consistent;
at the end no block may leak and every request that was not cancelled must
have produced exactly the tokens of an unconstrained run.
"""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.engine.core import EngineCore
from backend.engine.request import Request, RequestStatus, SamplingParams
from backend.scheduler.errors import QueueFullError
from backend.scheduler.output import SchedulerOutput
from backend.scheduler.updates import RequestUpdate
from tests.unit.backend.test_scheduler import VOCAB, SlotExecutor, make_core, reference_output


def check_invariants(core: EngineCore) -> None:
    sched = core.scheduler
    kv = sched.kv
    pool = kv.block_pool
    cfg = sched.config

    running_ids = {r.request_id for r in sched.running}
    waiting_ids = set(sched.waiting)
    assert len(running_ids) == len(sched.running), "request running twice"
    assert not running_ids & waiting_ids
    assert set(sched.requests) == running_ids | waiting_ids
    assert len(sched.running) <= cfg.max_num_seqs
    # Preempted requests go back to the queue even when it is full; new ones may not.
    assert sum(1 for r in sched.waiting.values() if r.num_preemptions == 0) <= cfg.max_waiting
    # Only running requests hold blocks; every running request holds some.
    assert set(kv.req_to_blocks) == running_ids
    assert set(kv.req_to_block_hashes) <= set(sched.requests)

    held: Counter[int] = Counter()
    for rid, table in kv.req_to_blocks.items():
        ids = [b.block_id for b in table]
        assert len(set(ids)) == len(ids), f"{rid} holds a block twice"
        held.update(ids)
        request = sched.requests[rid]
        assert request.status is RequestStatus.RUNNING
        assert 0 <= request.num_computed_tokens < request.num_tokens
        assert len(table) * kv.block_size >= request.num_computed_tokens
    for request in sched.waiting.values():
        assert request.status is RequestStatus.WAITING
        assert request.num_computed_tokens == 0

    free_ids = pool.free_block_ids()
    assert len(free_ids) == len(set(free_ids))
    assert sum(b.ref_cnt for b in pool.blocks) == sum(held.values())
    for block in pool.blocks:
        assert block.ref_cnt == held[block.block_id], f"block {block.block_id} ref count"
        assert (block.ref_cnt == 0) == (block.block_id in set(free_ids))
        if block.ref_cnt > 1:
            assert block.block_hash is not None, "only cached full blocks are shared"
        if block.block_hash is not None:
            assert pool.hash_to_block[block.block_hash] is block
    for block_hash, block in pool.hash_to_block.items():
        assert block.block_hash == block_hash
    assert kv.num_free_blocks == len(free_ids) == pool.num_blocks - len(held)


def check_output(core: EngineCore, out: SchedulerOutput) -> None:
    sched = core.scheduler
    assert out.num_tokens <= sched.config.max_num_batched_tokens
    assert len({c.request_id for c in out.chunks}) == len(out.chunks)
    for chunk in out.chunks:
        assert chunk.token_ids
        assert chunk.request_id not in out.preempted_ids


class RecordingCore(EngineCore):
    """Checks each step's scheduler output before it is executed."""

    def __init__(self, core: EngineCore) -> None:
        super().__init__(core.scheduler, core.executor)
        original = self.scheduler.schedule

        def schedule() -> SchedulerOutput:
            out = original()
            check_output(self, out)
            return out

        self.scheduler.schedule = schedule  # type: ignore[method-assign]


def simulate(
    seed: int,
    num_requests: int,
    *,
    num_blocks: int,
    block_size: int,
    budget: int,
    max_num_seqs: int,
    max_waiting: int,
    max_model_len: int,
    abort_rate: float,
) -> tuple[int, int]:
    """Drive the engine to completion; returns (preemptions, prefix-hit tokens)."""
    rng = random.Random(seed)
    base, sched, executor = make_core(
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_waiting=max_waiting,
        max_model_len=max_model_len,
    )
    core = RecordingCore(base)
    assert isinstance(executor, SlotExecutor)
    prefixes = [[rng.randrange(VOCAB) for _ in range(rng.randint(4, 24))] for _ in range(6)]
    max_len = min(max_model_len - 1, (num_blocks * block_size) // 2)

    def new_request(i: int) -> Request:
        prompt = list(rng.choice(prefixes)) if rng.random() < 0.6 else []
        prompt += [rng.randrange(VOCAB) for _ in range(rng.randint(1, 20))]
        prompt = prompt[: rng.randint(1, max_len)]
        stop = frozenset({rng.randrange(VOCAB)}) if rng.random() < 0.3 else frozenset()
        max_tokens = rng.randint(1, max(1, min(24, max_len + 1 - len(prompt))))
        return Request(
            request_id=f"r{i}",
            prompt_token_ids=prompt,
            sampling=SamplingParams(max_tokens=max_tokens, stop_token_ids=stop),
            priority=rng.randint(0, 2),
            arrival_time=float(i),
        )

    pending = [new_request(i) for i in range(num_requests)]
    pending.reverse()
    all_requests = {r.request_id: r for r in pending}
    received: dict[str, list[RequestUpdate]] = {}
    aborted: set[str] = set()
    num_steps = 0
    while pending or core.has_unfinished():
        num_steps += 1
        assert num_steps < 50 * num_requests, "engine stopped making progress"
        for _ in range(rng.randint(0, 3)):
            if not pending:
                break
            try:
                core.add_request(pending[-1])
            except QueueFullError:
                break
            pending.pop()
        if sched.requests and rng.random() < abort_rate:
            victim = rng.choice(sorted(sched.requests))
            core.abort_request(victim)
            aborted.add(victim)
            assert victim not in sched.requests
        if rng.random() < 0.02:
            core.abort_request("never-seen")
        check_invariants(core)
        for update in core.step():
            history = received.setdefault(update.request_id, [])
            assert not (history and history[-1].finished), "update after the final one"
            history.append(update)
        check_invariants(core)

    pool = sched.kv.block_pool
    assert pool.num_free_blocks == num_blocks
    assert all(b.ref_cnt == 0 for b in pool.blocks)
    assert sched.running == [] and sched.waiting == {} and sched.requests == {}
    assert sched.kv.req_to_blocks == {} and sched.kv.req_to_block_hashes == {}
    assert sorted(executor.released) == sorted(all_requests)

    for rid, request in all_requests.items():
        history = received[rid]
        assert history[-1].finished
        tokens = [t for u in history for t in u.new_token_ids]
        expected, reason = reference_output(
            request.prompt_token_ids, request.sampling, max_model_len
        )
        if rid in aborted:
            assert history[-1].finish_reason == "abort"
            assert tokens == expected[: len(tokens)]
        else:
            assert tokens == expected, rid
            assert history[-1].finish_reason == reason
            assert request.output_token_ids == expected
            assert all(u.num_prompt_tokens == request.num_prompt_tokens for u in history)
    return sched.num_preemptions_total, sched.kv.prefix_cache_hits


def test_thousand_random_requests_leak_nothing_and_match_the_reference() -> None:
    preemptions, hits = simulate(
        seed=1234,
        num_requests=1000,
        num_blocks=24,
        block_size=4,
        budget=24,
        max_num_seqs=6,
        max_waiting=20,
        max_model_len=64,
        abort_rate=0.05,
    )
    # The run must exercise what it claims to test.
    assert preemptions > 0
    assert hits > 0


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(
    seed=st.integers(0, 2**32 - 1),
    num_blocks=st.integers(8, 40),
    block_size=st.sampled_from([1, 2, 3, 4, 8]),
    budget=st.integers(1, 32),
    max_num_seqs=st.integers(1, 8),
    abort_rate=st.sampled_from([0.0, 0.1, 0.3]),
)
def test_random_configurations_keep_the_invariants(
    seed: int,
    num_blocks: int,
    block_size: int,
    budget: int,
    max_num_seqs: int,
    abort_rate: float,
) -> None:
    simulate(
        seed,
        40,
        num_blocks=num_blocks,
        block_size=block_size,
        budget=budget,
        max_num_seqs=max_num_seqs,
        max_waiting=8,
        max_model_len=48,
        abort_rate=abort_rate,
    )
