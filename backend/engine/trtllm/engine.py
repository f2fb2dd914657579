"""The `tensorrt_llm` engine: streams requests through a `tensorrt_llm.LLM`.

It holds the `LLM` object but never imports `tensorrt_llm`: `load.py` builds
the LLM and hands it in, so this class runs against a stand-in in tests on
any machine. Every call into the LLM happens on the event loop's thread,
where the LLM API's asynchronous results are meant to be consumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncGenerator, Callable
from typing import Any

import structlog

from backend.engine.request import Request
from backend.engine.trtllm.args import prompt_input, sampling_kwargs
from backend.engine.trtllm.outputs import read_output, to_update
from backend.engine.trtllm.stats import (
    InFlight,
    IterationSnapshot,
    StatsLimits,
    parse_iteration,
    snapshot,
)
from backend.scheduler.errors import QueueFullError
from backend.scheduler.stats import SchedulerStats
from backend.scheduler.updates import RequestUpdate

log = structlog.get_logger(__name__)


def _random_seed() -> int:
    return secrets.randbits(63)


class TrtllmEngine:
    """Serves requests through TensorRT-LLM's LLM API; satisfies `Engine`.

    `llm` is a `tensorrt_llm.LLM` (or anything with its `generate_async`,
    `get_stats_async` and `shutdown`), `sampling_params` its `SamplingParams`
    class. TensorRT-LLM queues and schedules on its own; this class bounds
    the requests in flight at `max_num_seqs + max_waiting` so an overloaded
    backend answers 429 like the torch engine, keeps the per-request figures
    `/stats` needs, and drains the iteration stats in the background.
    """

    def __init__(
        self,
        llm: Any,
        sampling_params: Callable[..., Any],
        limits: StatsLimits,
        *,
        stats_poll_s: float = 0.5,
        seed: Callable[[], int] = _random_seed,
    ) -> None:
        self._llm = llm
        self._sampling_params = sampling_params
        self._limits = limits
        self._poll_s = stats_poll_s
        self._seed = seed
        self._in_flight: dict[str, InFlight] = {}
        self._results: dict[str, Any] = {}
        self._latest: IterationSnapshot | None = None
        self._prefix_queries = 0
        self._prefix_hits = 0
        self._poller: asyncio.Task[None] | None = None
        self._started = False
        self._stopped = False
        self._failure: BaseException | None = None

    @property
    def stats(self) -> SchedulerStats:
        """The latest iteration stats merged with the requests in flight."""
        return snapshot(
            self._latest,
            self._in_flight.values(),
            self._limits,
            prefix_cache_queries=self._prefix_queries,
            prefix_cache_hits=self._prefix_hits,
        )

    @property
    def healthy(self) -> bool:
        """False before `start()`, after `stop()`, or once the LLM refused a submission."""
        return self._started and not self._stopped and self._failure is None

    def start(self) -> None:
        """Begin serving; call from inside the running event loop."""
        self._started = True

    async def stop(self) -> None:
        """Stop the stats drain and shut the LLM (and its worker processes) down."""
        self._stopped = True
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await asyncio.to_thread(self._llm.shutdown)

    def abort(self, request_id: str) -> None:
        """Abort a request by id; unknown or finished ids are ignored."""
        result = self._results.get(request_id)
        if result is not None:
            self._abort_result(request_id, result)

    async def generate(self, request: Request) -> AsyncGenerator[RequestUpdate, None]:
        """Submit `request` and yield its updates until it finishes.

        Raises QueueFullError past the in-flight bound and ValueError for an id
        already in flight; TensorRT-LLM's ValueError for a request it refuses
        (too long, say) passes through.
        Closing the generator early aborts the request in TensorRT-LLM.
        """
        limits = self._limits
        rid = request.request_id
        if rid in self._in_flight:
            raise ValueError(f"request id {rid!r} is already in flight")
        if len(self._in_flight) >= limits.max_num_seqs + limits.max_waiting:
            raise QueueFullError(limits.max_waiting)
        num_prompt = request.num_prompt_tokens
        sampling = request.sampling
        params = self._sampling_params(**sampling_kwargs(sampling, fallback_seed=self._seed()))
        try:
            result = self._llm.generate_async(
                prompt_input(request.prompt_token_ids), params, streaming=True
            )
        except RuntimeError as exc:
            # The LLM API raises RuntimeError once its executor has shut
            # down (a worker died): nothing more can be served.
            self._failure = exc
            raise
        self._ensure_poller()
        self._results[rid] = result
        self._in_flight[rid] = InFlight(num_prompt, 0, sampling.max_tokens, started=False)
        num_seen = 0
        started = False
        finished = False
        try:
            async for output in result:
                view = read_output(output)
                if not started:
                    # Counted once per request, at its first output, like the
                    # torch engine counts at admission.
                    started = True
                    self._prefix_queries += num_prompt
                    self._prefix_hits += view.cached_tokens
                update = to_update(
                    rid,
                    view,
                    num_seen=num_seen,
                    num_prompt_tokens=num_prompt,
                    stop_token_ids=sampling.stop_token_ids,
                )
                num_seen += len(update.new_token_ids)
                self._in_flight[rid] = InFlight(
                    num_prompt, num_seen, sampling.max_tokens, started=True
                )
                finished = update.finished
                yield update
                if finished:
                    return
            # The stream ended without a final output: report it as ended.
            finished = True
            yield RequestUpdate(
                request_id=rid,
                new_token_ids=[],
                finished=True,
                finish_reason="abort",
                num_prompt_tokens=num_prompt,
                num_cached_tokens=0,
            )
        finally:
            self._in_flight.pop(rid, None)
            self._results.pop(rid, None)
            if not finished:
                self._abort_result(rid, result)

    # --- background ------------------------------------------------------

    def _ensure_poller(self) -> None:
        # Started on the first submission: before it, the LLM API has no
        # stats queue and says so on stdout at every poll.
        if self._poller is None and not self._stopped:
            self._poller = asyncio.get_running_loop().create_task(self._poll_stats())

    async def _poll_stats(self) -> None:
        """Keep `_latest` at the newest iteration stats TensorRT-LLM published."""
        while True:
            try:
                async for item in self._llm.get_stats_async(timeout=self._poll_s):
                    self._latest = parse_iteration(item)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("trtllm_stats_failed", exc_info=True)
            # Between bursts the iterator ends at once: wait, do not spin.
            await asyncio.sleep(self._poll_s)

    def _abort_result(self, request_id: str, result: Any) -> None:
        try:
            result.abort()
        except Exception:
            log.warning("trtllm_abort_failed", request_id=request_id, exc_info=True)
