"""A snapshot of the scheduler's load, for metrics and routing."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerStats:
    """The scheduler's numbers at one moment."""

    num_running: int
    num_waiting: int
    queued_prompt_tokens: int
    """Prompt tokens whose KV is not computed yet, over waiting and running requests."""
    active_decode_tokens: int
    """Upper bound on tokens running requests may still generate: for each,
    `min(max_tokens - generated, max_model_len - num_tokens)`."""
    kv_usage: float
    """Fraction of KV blocks held by requests, 0..1."""
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_queries: int
    """Tokens looked up in the prefix cache, counted at each admission."""
    prefix_cache_hits: int
    """Tokens served from the prefix cache, counted at each admission."""
    num_preemptions_total: int
    max_num_seqs: int
    max_waiting: int
