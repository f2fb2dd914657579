"""A stand-in for `tensorrt_llm.LLM` with the LLM API's streaming shapes, on any CPU.

It has the parts of the LLM API the `tensorrt_llm` engine uses:
`generate_async(inputs, sampling_params, streaming=True)` returning a
`RequestOutput`-like object that is its own async iterator and is updated in
place (`outputs[0].token_ids` grows, `finished`, `finish_reason`,
`stop_reason`, `cached_tokens`, `abort()`), `get_stats_async(timeout)`
yielding iteration stats dicts, and `shutdown()`. The "model" is a hash of the
sequence, so outputs are deterministic.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Sequence
from types import SimpleNamespace
from typing import Any

# Field names of tensorrt_llm.SamplingParams (TensorRT-LLM 1.x): a typo in the
# engine's arguments fails here instead of on a GPU.
SAMPLING_FIELDS = frozenset(
    {
        "end_id",
        "pad_id",
        "max_tokens",
        "bad",
        "bad_token_ids",
        "stop",
        "stop_token_ids",
        "include_stop_str_in_output",
        "embedding_bias",
        "logits_processor",
        "apply_batched_logits_processor",
        "n",
        "best_of",
        "use_beam_search",
        "top_k",
        "top_p",
        "top_p_min",
        "top_p_reset_ids",
        "top_p_decay",
        "seed",
        "temperature",
        "min_tokens",
        "beam_search_diversity_rate",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "length_penalty",
        "early_stopping",
        "no_repeat_ngram_size",
        "min_p",
        "beam_width_array",
        "logprobs",
        "prompt_logprobs",
        "return_context_logits",
        "return_generation_logits",
        "exclude_input_from_output",
        "return_encoder_output",
        "return_perf_metrics",
        "additional_model_outputs",
        "lookahead_config",
        "guided_decoding",
        "ignore_eos",
        "detokenize",
        "add_special_tokens",
        "truncate_prompt_tokens",
        "skip_special_tokens",
        "spaces_between_special_tokens",
    }
)
TOKENS_PER_BLOCK = 32


def next_token(tokens: Sequence[int], vocab: int) -> int:
    """The fake model: the next token is a hash of the whole sequence."""
    h = 7
    for t in tokens:
        h = (h * 1_000_003 + t + 1) % 2_305_843_009_213_693_951
    return h % vocab


def sampling_params(**kwargs: Any) -> SimpleNamespace:
    """Stands in for `tensorrt_llm.SamplingParams`; refuses unknown field names."""
    unknown = set(kwargs) - SAMPLING_FIELDS
    if unknown:
        raise TypeError(f"SamplingParams got unexpected keyword arguments {sorted(unknown)}")
    return SimpleNamespace(**kwargs)


class FakeRequestOutput:
    """One request's streamed output, updated in place like the LLM API's."""

    def __init__(self, llm: FakeLLM, request_id: int, prompt: list[int], params: Any) -> None:
        self.llm = llm
        self.request_id = request_id
        self.prompt_token_ids = prompt
        self.params = params
        self.outputs = [SimpleNamespace(token_ids=[], finish_reason=None, stop_reason=None)]
        self.finished = False
        self.cached_tokens = llm.cached_prefix(prompt)
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        self.llm.aborted.append(self.request_id)

    def __aiter__(self) -> FakeRequestOutput:
        return self

    async def __anext__(self) -> FakeRequestOutput:
        if self.finished:
            raise StopAsyncIteration
        await asyncio.sleep(self.llm.token_delay_s)
        out = self.outputs[0]
        if self.aborted:
            out.finish_reason = "cancelled"
            self.finished = True
            return self
        token = next_token(self.prompt_token_ids + out.token_ids, self.llm.vocab)
        out.token_ids.append(token)
        stops = set(self.params.stop_token_ids or ())
        if token in stops:
            out.finish_reason, out.stop_reason = "stop", token
        elif len(out.token_ids) >= self.params.max_tokens:
            out.finish_reason = "length"
        self.finished = out.finish_reason is not None
        self.llm.record_iteration()
        return self


class FakeLLM:
    """Stands in for `tensorrt_llm.LLM` after loading."""

    def __init__(self, *, vocab: int = 50, token_delay_s: float = 0.0, num_blocks: int = 100):
        self.vocab = vocab
        self.token_delay_s = token_delay_s
        self.num_blocks = num_blocks
        self.submitted: list[tuple[dict[str, Any], Any]] = []
        self.results: list[FakeRequestOutput] = []
        self.aborted: list[int] = []
        self.stats_queue: list[dict[str, Any]] = []
        self.iteration = 0
        self.shut_down = False
        self.refuse_prompts_longer_than: int | None = None

    def cached_prefix(self, prompt: list[int]) -> int:
        """Whole blocks shared with an earlier prompt count as cached."""
        best = 0
        for result in self.results:
            common = 0
            for a, b in zip(result.prompt_token_ids, prompt, strict=False):
                if a != b:
                    break
                common += 1
            best = max(best, common // TOKENS_PER_BLOCK * TOKENS_PER_BLOCK)
        return best

    def generate_async(
        self, inputs: dict[str, Any], sampling_params: Any, streaming: bool = False
    ) -> FakeRequestOutput:
        if self.shut_down:
            raise RuntimeError("LLM is shutting down")
        assert streaming, "the engine streams"
        prompt = list(inputs["prompt_token_ids"])
        limit = self.refuse_prompts_longer_than
        if limit is not None and len(prompt) > limit:
            raise ValueError(f"prompt length ({len(prompt)}) exceeds {limit}")
        self.submitted.append((inputs, sampling_params))
        result = FakeRequestOutput(self, len(self.results), prompt, sampling_params)
        self.results.append(result)
        return result

    def active(self) -> list[FakeRequestOutput]:
        return [r for r in self.results if not r.finished]

    def record_iteration(self) -> None:
        """Queue an iteration stats dict like the PyTorch backend's."""
        self.iteration += 1
        active = self.active()
        used = sum(
            math.ceil((len(r.prompt_token_ids) + len(r.outputs[0].token_ids)) / TOKENS_PER_BLOCK)
            for r in active
        )
        self.stats_queue.append(
            {
                "iter": self.iteration,
                "iterLatencyMS": 1.5,
                "numActiveRequests": len(active),
                "numQueuedRequests": 0,
                "kvCacheStats": {
                    "maxNumBlocks": self.num_blocks,
                    "freeNumBlocks": self.num_blocks - used,
                    "usedNumBlocks": used,
                    "tokensPerBlock": TOKENS_PER_BLOCK,
                },
                "inflightBatchingStats": {"numPausedRequests": 0},
            }
        )

    async def _drain_stats(self) -> AsyncIterator[dict[str, Any]]:
        while self.stats_queue:
            yield self.stats_queue.pop(0)
        await asyncio.sleep(0)

    def get_stats_async(self, timeout: float = 2) -> AsyncIterator[dict[str, Any]]:
        return self._drain_stats()

    def shutdown(self) -> None:
        self.shut_down = True
