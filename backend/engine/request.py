"""A generation request as the engine core sees it: token ids in, token ids out."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class RequestStatus(enum.Enum):
    """Where a request is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        """True for the three terminal states."""
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. temperature 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    """Token ids that end generation (EOS is added here by the server)."""
    stop: tuple[str, ...] = ()
    """Stop strings; matched on the detokenized text outside the engine core."""
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        """True when sampling is argmax."""
        return self.temperature <= 0.0 or self.top_k == 1


@dataclass
class Request:
    """Mutable per-request state owned by the scheduler."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    priority: int = 0
    """Lower runs first (vLLM's convention); FCFS within a priority."""
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    """Tokens whose KV is in the cache (prefix hits included)."""
    num_cached_tokens: int = -1
    """Prompt tokens served from the prefix cache on first admission; -1 until admitted."""
    num_preemptions: int = 0
    first_scheduled_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        """Length of the prompt."""
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens so far."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by the generated tokens."""
        return self.prompt_token_ids + self.output_token_ids
