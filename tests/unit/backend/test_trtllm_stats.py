"""TensorRT-LLM iteration stats mapped onto `/stats`.

The samples are shaped like what `LLM.get_stats()` / `get_stats_async()`
return with `enable_iter_perf_stats` on the PyTorch backend (the example in
the trtllm-serve documentation, and the full set of fields of
`IterationStats.to_json_str()`).
"""

from __future__ import annotations

import json

import pytest

from backend.engine.trtllm.stats import (
    InFlight,
    IterationSnapshot,
    StatsLimits,
    latest_iteration,
    parse_iteration,
    snapshot,
)
from backend.scheduler.stats import SchedulerStats

# From the trtllm-serve docs' /metrics example (one request decoding).
SERVE_DOCS_SAMPLE = {
    "gpuMemUsage": 76665782272,
    "iter": 154,
    "iterLatencyMS": 7.00688362121582,
    "kvCacheStats": {
        "allocNewBlocks": 3126,
        "allocTotalBlocks": 3126,
        "cacheHitRate": 0.00128,
        "freeNumBlocks": 101253,
        "maxNumBlocks": 101256,
        "missedBlocks": 3121,
        "reusedBlocks": 4,
        "tokensPerBlock": 32,
        "usedNumBlocks": 3,
    },
    "numActiveRequests": 1,
}

# A busy iteration with every section filled in.
BUSY_SAMPLE = {
    "cpuMemUsage": 0,
    "gpuMemUsage": 4_000_000_000,
    "iter": 9051,
    "iterLatencyMS": 15.5,
    "maxBatchSizeRuntime": 32,
    "maxBatchSizeStatic": 64,
    "maxNumActiveRequests": 64,
    "maxNumTokensRuntime": 8192,
    "newActiveRequestsQueueLatencyMS": 0.8,
    "numActiveRequests": 5,
    "numCompletedRequests": 2,
    "numNewActiveRequests": 1,
    "numQueuedRequests": 3,
    "pinnedMemUsage": 0,
    "timestamp": "05-14-2026 10:21:07.120031",
    "kvCacheStats": {
        "allocNewBlocks": 210,
        "allocTotalBlocks": 260,
        "cacheHitRate": 0.85,
        "freeNumBlocks": 400,
        "maxNumBlocks": 1000,
        "missedBlocks": 210,
        "reusedBlocks": 50,
        "tokensPerBlock": 64,
        "usedNumBlocks": 600,
    },
    "inflightBatchingStats": {
        "avgNumDecodedTokensPerIter": 1.0,
        "microBatchId": 0,
        "numContextRequests": 2,
        "numCtxTokens": 256,
        "numGenRequests": 2,
        "numPausedRequests": 1,
        "numScheduledRequests": 4,
    },
    "staticBatchingStats": None,
    "specDecodingStats": None,
}

LIMITS = StatsLimits(max_num_seqs=64, max_waiting=256, max_model_len=8192)


def test_parse_the_documented_sample() -> None:
    assert parse_iteration(SERVE_DOCS_SAMPLE) == IterationSnapshot(
        iteration=154,
        num_active=1,
        num_queued=0,
        num_paused=0,
        kv_max_blocks=101256,
        kv_free_blocks=101253,
        kv_used_blocks=3,
    )


def test_parse_a_busy_iteration_given_as_json_text() -> None:
    assert parse_iteration(json.dumps(BUSY_SAMPLE)) == IterationSnapshot(
        iteration=9051,
        num_active=5,
        num_queued=3,
        num_paused=1,
        kv_max_blocks=1000,
        kv_free_blocks=400,
        kv_used_blocks=600,
    )


def test_parse_without_kv_or_batching_sections() -> None:
    bare = {"iter": 1, "numActiveRequests": 2, "kvCacheStats": None}
    assert parse_iteration(bare) == IterationSnapshot(1, 2, 0, 0, None, None, None)
    with pytest.raises(ValueError, match="JSON object"):
        parse_iteration("[1]")


def test_latest_iteration_picks_the_highest_iter() -> None:
    assert latest_iteration([]) is None
    latest = latest_iteration([BUSY_SAMPLE, SERVE_DOCS_SAMPLE])
    assert latest is not None and latest.iteration == 9051


def started(prompt: int, generated: int, max_tokens: int) -> InFlight:
    return InFlight(prompt, generated, max_tokens, started=True)


def test_busy_snapshot() -> None:
    in_flight = [
        started(100, 10, 50),
        started(200, 5, 500),
        started(8000, 100, 1000),  # bounded by the context: 8192 - 8100
        started(30, 30, 30),  # done generating, final output not seen yet
        InFlight(300, 0, 64, started=False),
        InFlight(40, 0, 64, started=False),
        InFlight(50, 0, 64, started=False),
        InFlight(60, 0, 64, started=False),
    ]
    stats = snapshot(
        parse_iteration(BUSY_SAMPLE),
        in_flight,
        LIMITS,
        prefix_cache_queries=5000,
        prefix_cache_hits=1200,
    )
    assert stats == SchedulerStats(
        num_running=4,  # 5 active, 1 of them paused
        num_waiting=4,
        queued_prompt_tokens=300 + 40 + 50 + 60,
        active_decode_tokens=40 + 495 + 92 + 0,
        kv_usage=0.6,
        num_free_blocks=400,
        num_total_blocks=1000,
        prefix_cache_queries=5000,
        prefix_cache_hits=1200,
        num_preemptions_total=0,
        max_num_seqs=64,
        max_waiting=256,
    )


def test_idle_after_the_last_request_despite_stale_iteration_stats() -> None:
    stats = snapshot(
        parse_iteration(SERVE_DOCS_SAMPLE),
        [],
        LIMITS,
        prefix_cache_queries=12,
        prefix_cache_hits=0,
    )
    assert (stats.num_running, stats.num_waiting) == (0, 0)
    assert stats.kv_usage == 0.0
    assert stats.num_free_blocks == stats.num_total_blocks == 101256


def test_before_any_iteration_stats_the_engine_counts_alone() -> None:
    stats = snapshot(
        None,
        [started(10, 1, 5), InFlight(20, 0, 5, started=False)],
        LIMITS,
        prefix_cache_queries=0,
        prefix_cache_hits=0,
    )
    assert (stats.num_running, stats.num_waiting) == (1, 1)
    assert (stats.num_total_blocks, stats.num_free_blocks, stats.kv_usage) == (0, 0, 0.0)


def test_stale_counts_never_exceed_the_requests_in_flight() -> None:
    stats = snapshot(
        parse_iteration(BUSY_SAMPLE),
        [started(10, 1, 5)],
        LIMITS,
        prefix_cache_queries=0,
        prefix_cache_hits=0,
    )
    assert (stats.num_running, stats.num_waiting) == (1, 0)
