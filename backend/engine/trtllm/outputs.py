"""TensorRT-LLM's streamed `RequestOutput`s as the engine's `RequestUpdate`s.

With `streaming=True`, `LLM.generate_async` yields the same `RequestOutput`
again and again, its first `CompletionOutput` holding every token generated so
far; each update here carries the tokens the previous ones did not.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass
from typing import Any

from backend.scheduler.updates import FinishReason, RequestUpdate

_FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "cancelled": "abort",
    "timeout": "abort",
}


@dataclass(frozen=True)
class OutputView:
    """The fields of one streamed `RequestOutput` this engine reads."""

    token_ids: tuple[int, ...]
    """Every token generated so far (`outputs[0].token_ids`)."""
    finished: bool
    finish_reason: str | None
    """"stop", "length", "timeout" or "cancelled"; None while running."""
    stop_reason: int | str | None
    """The stop token id or stop string that ended generation, if one did."""
    cached_tokens: int
    """Prompt tokens served from the KV-cache reuse (prefix cache)."""


def read_output(result: Any) -> OutputView:
    """Take a snapshot of a `tensorrt_llm` `RequestOutput` (read by attribute name).

    `cached_tokens` is read defensively: releases before it existed lack it.
    """
    completion = result.outputs[0]
    cached = getattr(result, "cached_tokens", 0)
    return OutputView(
        token_ids=tuple(completion.token_ids or ()),
        finished=bool(result.finished),
        finish_reason=completion.finish_reason,
        stop_reason=completion.stop_reason,
        cached_tokens=cached if isinstance(cached, int) and cached > 0 else 0,
    )


def to_update(
    request_id: str,
    view: OutputView,
    *,
    num_seen: int,
    num_prompt_tokens: int,
    stop_token_ids: Set[int],
) -> RequestUpdate:
    """The update for `view`, given that the caller already passed on `num_seen` tokens.

    A finished request that ends on one of its stop token ids (EOS included)
    marks it as `stop_token_id`, so it counts as generated but stays out of
    the text, as in the torch engine.
    """
    new = list(view.token_ids[num_seen:])
    finish: FinishReason | None = None
    stop_token_id: int | None = None
    if view.finished:
        finish = _FINISH_REASONS.get(view.finish_reason or "stop", "abort")
        if finish == "stop" and new and new[-1] in stop_token_ids:
            stop_token_id = new[-1]
    return RequestUpdate(
        request_id=request_id,
        new_token_ids=new,
        finished=view.finished,
        finish_reason=finish,
        num_prompt_tokens=num_prompt_tokens,
        num_cached_tokens=view.cached_tokens,
        stop_token_id=stop_token_id,
    )
