"""Decides, step by step, which tokens of which requests to compute.

There are no prefill and decode phases: every request has a number of
computed tokens that catches up with its known tokens within a per-step token
budget. Running requests go first, one-token decodes before unfinished
prefills so a long prompt never stalls ongoing generations; waiting requests
are then admitted by priority and arrival while the budget, `max_num_seqs` and
the KV pool allow.

When a running request needs a block and the pool has none, the running
request with the lowest priority and latest arrival loses its blocks and goes
back to the waiting queue (preemption by recompute). Its generated tokens are
kept and recomputed like prompt tokens when it is admitted again.
"""

from __future__ import annotations

import heapq
import itertools
import time

from backend.config import SchedulerConfig
from backend.engine.request import Request, RequestStatus
from backend.kv_cache.hashing import token_slice
from backend.kv_cache.manager import KVCacheManager
from backend.scheduler.errors import QueueFullError
from backend.scheduler.output import ModelOutput, ScheduledChunk, SchedulerOutput
from backend.scheduler.stats import SchedulerStats
from backend.scheduler.updates import FinishReason, RequestUpdate

_WaitingEntry = tuple[int, float, int, Request]
"""(priority, arrival_time, arrival sequence number, request): a heap key that never ties."""


class Scheduler:
    """Owns request state and the KV cache manager; produces one `SchedulerOutput` per step."""

    def __init__(self, scheduler_config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = scheduler_config
        self.kv = kv
        self.requests: dict[str, Request] = {}
        """Every unfinished request, waiting or running."""
        self.running: list[Request] = []
        """Requests holding KV blocks, in admission order."""
        self.waiting: dict[str, Request] = {}
        """Requests not holding KV blocks, new or preempted."""
        # A heap with lazy deletion: entries of aborted requests are dropped
        # when they reach the top, so an abort costs O(1).
        self._waiting_heap: list[_WaitingEntry] = []
        self._arrival_seq = itertools.count()
        self._request_to_seq: dict[str, int] = {}
        self.num_preemptions_total = 0

    # --- requests in and out -------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request.

        Raises QueueFullError when `max_waiting` requests already wait (preempted
        requests go back to the queue even past that limit: they were admitted
        once and cannot be refused), and
        ValueError for a request that could never complete: a duplicate id, an
        empty prompt, `max_tokens < 1`, a prompt that leaves no room below
        `max_model_len`, or one needing more KV blocks than the pool has.
        """
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(self.config.max_waiting)
        self._validate(request)
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self._request_to_seq[request.request_id] = next(self._arrival_seq)
        self._push_waiting(request)

    def abort_request(self, request_id: str) -> Request | None:
        """Stop a request now and free its blocks; returns it, or None for an unknown id."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.pop(request_id, None)
            self._compact_waiting_heap()
        self.kv.free(request)
        self._request_to_seq.pop(request_id, None)
        request.status = RequestStatus.FINISHED_ABORTED
        return request

    def has_unfinished(self) -> bool:
        """True while any request waits or runs."""
        return bool(self.requests)

    # --- one step -----------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's chunks within the token budget, preempting when blocks run out."""
        budget = self.config.max_num_batched_tokens
        # Insertion-ordered: the order of the chunks in the output.
        req_to_num_tokens: dict[str, int] = {}
        preempted_ids: list[str] = []

        decodes = [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1]
        prefills = [r for r in self.running if r.num_tokens - r.num_computed_tokens > 1]
        for request in itertools.chain(decodes, prefills):
            if budget <= 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this step
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while self.kv.allocate_slots(request, num_new) is None:
                victim = self._pick_victim()
                budget += req_to_num_tokens.pop(victim.request_id, 0)
                self._preempt(victim)
                preempted_ids.append(victim.request_id)
                if victim is request:
                    break
            else:  # allocated without preempting `request` itself
                req_to_num_tokens[request.request_id] = num_new
                budget -= num_new

        # A step that had to preempt has no blocks to spare, and admitting now
        # could hand the blocks straight back to the request just preempted.
        if not preempted_ids:
            self._admit_waiting(budget, req_to_num_tokens)

        chunks = [self._make_chunk(rid, n) for rid, n in req_to_num_tokens.items()]
        return SchedulerOutput(chunks=chunks, preempted_ids=preempted_ids)

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_output: ModelOutput
    ) -> list[RequestUpdate]:
        """Advance each scheduled request by its chunk and append sampled tokens.

        Chunks of requests that finished or were aborted since `schedule` are
        ignored. Finished requests release their blocks here.
        """
        updates: list[RequestUpdate] = []
        finished: set[str] = set()
        for chunk in scheduler_output.chunks:
            request = self.requests.get(chunk.request_id)
            if (
                request is None
                or request.status is not RequestStatus.RUNNING
                or request.num_computed_tokens != chunk.start_pos
            ):
                continue
            request.num_computed_tokens += len(chunk.token_ids)
            self.kv.cache_blocks(request)
            if not chunk.sample:
                continue
            token = model_output.sampled.get(request.request_id)
            if token is None:
                raise RuntimeError(f"executor sampled no token for {request.request_id}")
            request.output_token_ids.append(token)
            reason = self._finish_reason(request, token)
            stop_token_id = token if reason == "stop" else None
            if reason is not None:
                request.status = (
                    RequestStatus.FINISHED_STOPPED
                    if reason == "stop"
                    else RequestStatus.FINISHED_LENGTH
                )
                self._release(request)
                finished.add(request.request_id)
            updates.append(
                RequestUpdate(
                    request_id=request.request_id,
                    new_token_ids=[token],
                    finished=reason is not None,
                    finish_reason=reason,
                    num_prompt_tokens=request.num_prompt_tokens,
                    num_cached_tokens=max(request.num_cached_tokens, 0),
                    stop_token_id=stop_token_id,
                )
            )
        if finished:
            # One pass instead of a list.remove per finished request.
            self.running = [r for r in self.running if r.request_id not in finished]
        return updates

    def stats(self) -> SchedulerStats:
        """A snapshot of load and cache numbers."""
        queued_prompt_tokens = 0
        for request in self.requests.values():
            queued_prompt_tokens += max(0, request.num_prompt_tokens - request.num_computed_tokens)
        max_model_len = self.config.max_model_len
        active_decode_tokens = sum(
            max(
                0,
                min(
                    r.sampling.max_tokens - len(r.output_token_ids),
                    max_model_len - r.num_tokens,
                ),
            )
            for r in self.running
        )
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            queued_prompt_tokens=queued_prompt_tokens,
            active_decode_tokens=active_decode_tokens,
            kv_usage=self.kv.usage,
            num_free_blocks=self.kv.num_free_blocks,
            num_total_blocks=self.kv.num_blocks,
            prefix_cache_queries=self.kv.prefix_cache_queries,
            prefix_cache_hits=self.kv.prefix_cache_hits,
            num_preemptions_total=self.num_preemptions_total,
            max_num_seqs=self.config.max_num_seqs,
            max_waiting=self.config.max_waiting,
        )

    # --- helpers --------------------------------------------------------

    def _validate(self, request: Request) -> None:
        rid = request.request_id
        if rid in self.requests:
            raise ValueError(f"request {rid} is already in the engine")
        if request.num_prompt_tokens == 0:
            raise ValueError(f"request {rid} has an empty prompt")
        if request.sampling.max_tokens < 1:
            raise ValueError(f"request {rid} asks for max_tokens < 1")
        if request.num_tokens >= self.config.max_model_len:
            raise ValueError(
                f"request {rid} has {request.num_tokens} tokens, "
                f"max_model_len is {self.config.max_model_len}"
            )
        # The last generated token is never computed, hence the -1.
        final_len = min(
            request.num_prompt_tokens + request.sampling.max_tokens, self.config.max_model_len
        )
        num_blocks = -(-(final_len - 1) // self.kv.block_size)
        if num_blocks > self.kv.num_blocks:
            raise ValueError(
                f"request {rid} needs up to {num_blocks} KV blocks, "
                f"the pool has {self.kv.num_blocks}"
            )

    def _admit_waiting(self, budget: int, req_to_num_tokens: dict[str, int]) -> None:
        """Admit waiting requests in (priority, arrival) order within `budget` tokens.

        Stops at the first request that does not fit, so a large request at the
        head is not overtaken forever by smaller ones behind it.
        """
        while budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self._peek_waiting()
            if request is None:
                break
            computed_blocks, num_hit_tokens = self.kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit_tokens, budget)
            if self.kv.allocate_slots(request, num_new, computed_blocks) is None:
                break
            heapq.heappop(self._waiting_heap)
            del self.waiting[request.request_id]
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            req_to_num_tokens[request.request_id] = num_new
            budget -= num_new

    def _make_chunk(self, request_id: str, num_tokens: int) -> ScheduledChunk:
        request = self.requests[request_id]
        start = request.num_computed_tokens
        end = start + num_tokens
        return ScheduledChunk(
            request_id=request_id,
            token_ids=token_slice(request.prompt_token_ids, request.output_token_ids, start, end),
            start_pos=start,
            block_ids=self.kv.block_ids(request_id),
            sample=end == request.num_tokens,
            sampling=request.sampling,
            num_generated=len(request.output_token_ids),
        )

    def _finish_reason(self, request: Request, token: int) -> FinishReason | None:
        if token in request.sampling.stop_token_ids:
            return "stop"
        if len(request.output_token_ids) >= request.sampling.max_tokens:
            return "length"
        if request.num_tokens >= self.config.max_model_len:
            return "length"
        return None

    def _victim_key(self, request: Request) -> tuple[int, float, int]:
        return (request.priority, request.arrival_time, self._request_to_seq[request.request_id])

    def _pick_victim(self) -> Request:
        return max(self.running, key=self._victim_key)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        request.status = RequestStatus.WAITING
        self._push_waiting(request)

    def _release(self, request: Request) -> None:
        """Forget a request that finished on its own (it stays in `running` until the caller
        rebuilds the list)."""
        self.kv.free(request)
        del self.requests[request.request_id]
        self._request_to_seq.pop(request.request_id, None)

    def _push_waiting(self, request: Request) -> None:
        self.waiting[request.request_id] = request
        entry = (
            request.priority,
            request.arrival_time,
            self._request_to_seq[request.request_id],
            request,
        )
        heapq.heappush(self._waiting_heap, entry)

    def _peek_waiting(self) -> Request | None:
        heap = self._waiting_heap
        while heap:
            request = heap[0][3]
            if self.waiting.get(request.request_id) is request:
                return request
            heapq.heappop(heap)
        return None

    def _compact_waiting_heap(self) -> None:
        # Bounds the garbage left by aborted waiting requests.
        if len(self._waiting_heap) > 2 * len(self.waiting) + 64:
            self._waiting_heap = [
                e for e in self._waiting_heap if self.waiting.get(e[3].request_id) is e[3]
            ]
            heapq.heapify(self._waiting_heap)
