"""The synchronous engine core: schedule, execute, update, one step at a time.

Single-threaded by design; whoever drives it from asyncio serialises calls.
"""

from __future__ import annotations

from typing import Protocol

from backend.engine.request import Request
from backend.scheduler.output import ModelOutput, SchedulerOutput
from backend.scheduler.scheduler import Scheduler
from backend.scheduler.updates import RequestUpdate


class Executor(Protocol):
    """Runs the model for one `SchedulerOutput` and keeps any per-request state."""

    def execute(self, scheduler_output: SchedulerOutput) -> ModelOutput:
        """Compute the scheduled chunks and sample one token per chunk with `sample=True`."""
        ...

    def release(self, request_id: str) -> None:
        """Drop per-request state; called once when a request finishes or is aborted."""
        ...


class EngineCore:
    """Drives a `Scheduler` and an `Executor`: `step()` = schedule -> execute -> update."""

    def __init__(self, scheduler: Scheduler, executor: Executor) -> None:
        self.scheduler = scheduler
        self.executor = executor
        # Aborts are reported, and released in the executor, from the next step
        # so every executor call happens inside `step()`.
        self._aborted: list[Request] = []

    def add_request(self, request: Request) -> None:
        """Queue a request; raises the scheduler's QueueFullError or ValueError."""
        self.scheduler.add_request(request)

    def abort_request(self, request_id: str) -> None:
        """Abort a request and free its KV blocks now; unknown ids are ignored."""
        request = self.scheduler.abort_request(request_id)
        if request is not None:
            self._aborted.append(request)

    def has_unfinished(self) -> bool:
        """True while a request runs or waits, or an abort is still to be reported."""
        return bool(self._aborted) or self.scheduler.has_unfinished()

    def step(self) -> list[RequestUpdate]:
        """Run one engine step and return the per-request updates it produced."""
        updates = self._drain_aborted()
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.chunks:
            model_output = self.executor.execute(scheduler_output)
        else:
            model_output = ModelOutput()
        step_updates = self.scheduler.update_from_output(scheduler_output, model_output)
        for update in step_updates:
            if update.finished:
                self.executor.release(update.request_id)
        updates.extend(step_updates)
        return updates

    def _drain_aborted(self) -> list[RequestUpdate]:
        aborted, self._aborted = self._aborted, []
        updates: list[RequestUpdate] = []
        for request in aborted:
            self.executor.release(request.request_id)
            updates.append(
                RequestUpdate(
                    request_id=request.request_id,
                    new_token_ids=[],
                    finished=True,
                    finish_reason="abort",
                    num_prompt_tokens=request.num_prompt_tokens,
                    num_cached_tokens=max(request.num_cached_tokens, 0),
                )
            )
        return updates
