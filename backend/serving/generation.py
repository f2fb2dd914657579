"""Turns one OpenAI request into engine requests and text deltas.

Owns what sits between tokens and text: the context-length checks, the
sampling parameters, incremental detokenization, stop strings and the usage
numbers. The HTTP layer only formats what this yields.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from backend.api.errors import InvalidRequest, Overloaded
from backend.api.protocol import _SamplingFields
from backend.engine.protocol import Engine
from backend.engine.request import Request, SamplingParams
from backend.scheduler.errors import QueueFullError
from backend.serving.metrics import EngineMetrics
from backend.serving.stop import StopMatcher
from backend.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class GenerationState:
    """What is known about one request's output so far."""

    request_id: str
    prompt_tokens: int
    created: int = field(default_factory=lambda: int(time.time()))
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None


class GenerationService:
    """Runs requests through the engine and yields their text."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        *,
        max_model_len: int,
        metrics: EngineMetrics,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.metrics = metrics

    def build_request(
        self, request_id: str, prompt_ids: list[int], body: _SamplingFields, limit: int | None
    ) -> Request:
        """Check lengths and map the OpenAI fields onto engine sampling parameters."""
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if n_prompt >= self.max_model_len:
            raise InvalidRequest(
                f"This model's maximum context length is {self.max_model_len} tokens; "
                f"the prompt has {n_prompt} tokens.",
                code="context_length_exceeded",
                param="messages",
            )
        room = self.max_model_len - n_prompt
        if limit is not None and limit > room:
            raise InvalidRequest(
                f"This model's maximum context length is {self.max_model_len} tokens; "
                f"the prompt has {n_prompt} tokens and max_tokens is {limit}, "
                f"{n_prompt + limit} in total.",
                code="context_length_exceeded",
                param="max_tokens",
            )
        vocab = self.tokenizer.vocab_size
        extra_stops = frozenset(body.stop_token_ids or ())
        if any(t < 0 or t >= vocab for t in extra_stops):
            raise InvalidRequest(f"stop_token_ids must be in [0, {vocab})", param="stop_token_ids")
        stop_ids = extra_stops if body.ignore_eos else extra_stops | self.tokenizer.eos_token_ids
        sampling = SamplingParams(
            max_tokens=limit if limit is not None else room,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop_token_ids=stop_ids,
            stop=body.stop_strings,
            ignore_eos=body.ignore_eos,
        )
        return Request(
            request_id=request_id,
            prompt_token_ids=prompt_ids,
            sampling=sampling,
            priority=body.priority,
        )

    async def stream(self, request: Request, state: GenerationState) -> AsyncGenerator[str, None]:
        """Yield text deltas; `state` holds usage and finish reason when done.

        Raises Overloaded when the waiting queue is full, before any text.
        """
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = StopMatcher(request.sampling.stop)
        started = time.monotonic()
        last = started
        first = True
        updates = self.engine.generate(request)
        try:
            async for update in updates:
                state.cached_tokens = max(update.num_cached_tokens, 0)
                state.completion_tokens += len(update.new_token_ids)
                if update.new_token_ids:
                    now = time.monotonic()
                    if first:
                        self.metrics.observe_first_token(now - started)
                        first = False
                    else:
                        self.metrics.observe_inter_token(now - last, len(update.new_token_ids))
                    last = now
                printable = update.printable_token_ids
                text = stops.feed(detok.push(printable)) if printable else ""
                if not stops.stopped and update.finished:
                    text += stops.feed(detok.flush())
                    if not stops.stopped:
                        text += stops.flush()
                if stops.stopped:
                    state.finish_reason = "stop"
                elif update.finished:
                    state.finish_reason = "length" if update.finish_reason == "length" else "stop"
                if text:
                    yield text
                if state.finish_reason is not None:
                    return
        except QueueFullError as exc:
            raise Overloaded("the backend's waiting queue is full; retry later") from exc
        except ValueError as exc:
            # The scheduler refuses requests it could never run (for
            # example one that needs more KV blocks than the pool holds).
            raise InvalidRequest(str(exc)) from exc
        finally:
            # Closing the engine's stream now, not whenever it is collected,
            # is what aborts a request whose client left or whose text
            # reached a stop string.
            await updates.aclose()
            self.metrics.observe_finished(
                request,
                state.prompt_tokens,
                state.completion_tokens,
                time.monotonic() - started,
                state.finish_reason,
            )
