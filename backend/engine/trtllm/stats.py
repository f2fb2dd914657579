"""TensorRT-LLM's iteration stats, plus the engine's own bookkeeping, as `SchedulerStats`.

`LLM.get_stats_async()` yields one dict per executor iteration (with
`enable_iter_perf_stats`), for example::

    {"iter": 154, "numActiveRequests": 1, "numQueuedRequests": 0,
     "kvCacheStats": {"maxNumBlocks": 101256, "freeNumBlocks": 101253,
                      "usedNumBlocks": 3, "tokensPerBlock": 32, ...},
     "inflightBatchingStats": {"numPausedRequests": 0, ...}, ...}

Those figures only change while iterations run: once the last request
finishes no new dict comes, and the last one still counts it. So the engine's
own count of the requests it has in flight is the truth for how many there
are, and the iteration stats only say how they split between running and
waiting and how full the KV cache is. Token-level figures (queued prompt
tokens, tokens still to decode) and the prefix-cache counters come from the
engine's bookkeeping, since iteration stats do not carry them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from backend.scheduler.stats import SchedulerStats


@dataclass(frozen=True)
class IterationSnapshot:
    """The figures of one TensorRT-LLM iteration stats dict this engine uses."""

    iteration: int | None
    num_active: int
    """Requests the executor holds (scheduled this iteration or paused)."""
    num_queued: int
    """Requests submitted but not yet taken in by the executor."""
    num_paused: int
    """Active requests the batch scheduler could not fit this iteration."""
    kv_max_blocks: int | None
    kv_free_blocks: int | None
    kv_used_blocks: int | None


@dataclass(frozen=True)
class InFlight:
    """The engine's own view of one request it has submitted and not seen finish."""

    num_prompt_tokens: int
    num_generated: int
    max_tokens: int
    started: bool
    """True once the first output token came back (its prompt is computed)."""


@dataclass(frozen=True)
class StatsLimits:
    """Configured limits reported alongside the load."""

    max_num_seqs: int
    max_waiting: int
    max_model_len: int


def _count(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


def _section(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key)
    return value if isinstance(value, Mapping) else {}


def parse_iteration(raw: str | Mapping[str, Any]) -> IterationSnapshot:
    """Read one iteration stats item: a dict, or the JSON string older releases yield.

    Missing figures read as 0 requests and unknown (None) KV blocks.
    """
    data: Any = json.loads(raw) if isinstance(raw, str) else raw
    if not isinstance(data, Mapping):
        raise ValueError(f"iteration stats must be a JSON object, not {type(data).__name__}")
    kv = _section(data, "kvCacheStats")
    batching = _section(data, "inflightBatchingStats")
    return IterationSnapshot(
        iteration=_count(data, "iter"),
        num_active=_count(data, "numActiveRequests") or 0,
        num_queued=_count(data, "numQueuedRequests") or 0,
        num_paused=_count(batching, "numPausedRequests") or 0,
        kv_max_blocks=_count(kv, "maxNumBlocks"),
        kv_free_blocks=_count(kv, "freeNumBlocks"),
        kv_used_blocks=_count(kv, "usedNumBlocks"),
    )


def latest_iteration(items: Iterable[str | Mapping[str, Any]]) -> IterationSnapshot | None:
    """The snapshot with the highest iteration number among `items` (None if empty)."""
    best: IterationSnapshot | None = None
    for item in items:
        snap = parse_iteration(item)
        if best is None or (snap.iteration or 0) >= (best.iteration or 0):
            best = snap
    return best


def snapshot(
    latest: IterationSnapshot | None,
    in_flight: Iterable[InFlight],
    limits: StatsLimits,
    *,
    prefix_cache_queries: int,
    prefix_cache_hits: int,
) -> SchedulerStats:
    """The `/stats` figures from the latest iteration stats and the requests in flight."""
    requests = list(in_flight)
    num_in_flight = len(requests)
    if latest is None:
        running = sum(r.started for r in requests)
    else:
        # Paused requests are held by the executor but got no compute: waiting.
        running = min(max(latest.num_active - latest.num_paused, 0), num_in_flight)
    total_blocks = latest.kv_max_blocks if latest is not None else None
    if latest is None or total_blocks is None:
        total_blocks, free_blocks, used_blocks = 0, 0, 0
    elif num_in_flight == 0:
        # Nothing holds blocks; the last iteration's figures are stale.
        free_blocks, used_blocks = total_blocks, 0
    else:
        free_blocks = latest.kv_free_blocks if latest.kv_free_blocks is not None else 0
        used_blocks = (
            latest.kv_used_blocks
            if latest.kv_used_blocks is not None
            else max(total_blocks - free_blocks, 0)
        )
    queued_prompt_tokens = sum(r.num_prompt_tokens for r in requests if not r.started)
    active_decode_tokens = sum(
        max(
            0,
            min(
                r.max_tokens - r.num_generated,
                limits.max_model_len - r.num_prompt_tokens - r.num_generated,
            ),
        )
        for r in requests
        if r.started
    )
    return SchedulerStats(
        num_running=running,
        num_waiting=num_in_flight - running,
        queued_prompt_tokens=queued_prompt_tokens,
        active_decode_tokens=active_decode_tokens,
        kv_usage=used_blocks / total_blocks if total_blocks else 0.0,
        num_free_blocks=free_blocks,
        num_total_blocks=total_blocks,
        prefix_cache_queries=prefix_cache_queries,
        prefix_cache_hits=prefix_cache_hits,
        # TensorRT-LLM's iteration stats do not count preemptions.
        num_preemptions_total=0,
        max_num_seqs=limits.max_num_seqs,
        max_waiting=limits.max_waiting,
    )
