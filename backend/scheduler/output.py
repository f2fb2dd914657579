"""The only message from scheduler to executor, and the executor's answer."""

from __future__ import annotations

from dataclasses import dataclass, field

from backend.engine.request import SamplingParams


@dataclass(frozen=True)
class ScheduledChunk:
    """One request's share of a step: compute KV for `token_ids` at positions
    `start_pos .. start_pos + len(token_ids) - 1`, writing into `block_ids`.
    """

    request_id: str
    token_ids: list[int]
    start_pos: int
    block_ids: list[int]
    """The request's whole block table (not just new blocks), in position order."""
    sample: bool
    """True when this chunk reaches the end of the known tokens, so a new token is sampled."""
    sampling: SamplingParams
    num_generated: int
    """Tokens generated before this step: lets the executor seed reproducibly per position."""


@dataclass(frozen=True)
class SchedulerOutput:
    """What to run this step."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    """Requests that lost their KV blocks this step; they will be recomputed later."""

    @property
    def num_tokens(self) -> int:
        """Tokens computed this step, over all chunks."""
        return sum(len(c.token_ids) for c in self.chunks)


@dataclass(frozen=True)
class ModelOutput:
    """The executor's answer: one sampled token per chunk with `sample=True`."""

    sampled: dict[str, int] = field(default_factory=dict)
