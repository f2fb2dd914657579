"""The admission queue of one model pool: slots, waiting, deadlines, disconnects.

A pool has ``capacity`` slots (concurrent upstream requests). A request takes
a slot straight away when one is free and nobody waits (the fast path: no
suspension, a counter and a small object); otherwise it waits on a future in
the ``FairScheduler``, which decides who gets each slot that frees. A freed
slot passes directly to the chosen waiter, so a newcomer can never take it
first.

A waiting request ends in one of four ways:

- granted: its future resolves and it owns a ``Slot``;
- timed out after its class's ``max_queue_wait_s``: 503 ``queue_timeout``;
- pushed out of a full queue, or refused on arrival: 503 ``queue_full``;
- abandoned: its client disconnected (``ClientClosedRequestError``) or its
  task was cancelled. It leaves the queue at once; had a slot been granted in
  the same instant, that slot passes on to the next waiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import structlog

from gateway.errors import ClientClosedRequestError, ServiceUnavailableError
from gateway.policy.compiled import PriorityClass
from gateway.queueing.scheduler import ClassConfig, ClassDepth, FairScheduler, QueueEntry

log = structlog.get_logger(__name__)

Receive = Callable[[], Awaitable[Mapping[str, Any]]]
"""An ASGI ``receive``: the queue watches it for ``http.disconnect``."""

_HOLD_EWMA_ALPHA = 0.1
_INITIAL_HOLD_S = 1.0


@dataclass(frozen=True, slots=True)
class ClassStats:
    """One class of one pool: what waits now, and what happened so far."""

    num_queued: int
    queued_tokens: int
    num_tenants: int
    num_granted_after_wait: int
    num_rejected_full: int
    num_timed_out: int
    num_abandoned: int


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of one pool's queue, for metrics and the admin API."""

    pool: str
    capacity: int
    in_flight: int
    classes: Mapping[str, ClassStats]


class _Counters:
    __slots__ = ("abandoned", "granted", "rejected", "timed_out")

    def __init__(self) -> None:
        self.granted = 0
        self.rejected = 0
        self.timed_out = 0
        self.abandoned = 0


class Slot:
    """The right to have one request in flight to the pool.

    ``release()`` gives it back (idempotent). As an async context manager
    (see ``PoolQueue.admit``) it is released when the block ends unless
    ``keep()`` handed it to the response, which then releases it when the
    response ends.
    """

    __slots__ = ("_kept", "_queue", "_released", "granted_at", "priority", "wait_s")

    def __init__(self, queue: PoolQueue, priority: str, wait_s: float, granted_at: float) -> None:
        self._queue = queue
        self._released = False
        self._kept = False
        self.priority = priority
        """The request's priority class."""
        self.wait_s = wait_s
        """Seconds the request waited in the queue (0.0 on the fast path)."""
        self.granted_at = granted_at

    @property
    def released(self) -> bool:
        """Whether the slot was given back."""
        return self._released

    def keep(self) -> None:
        """Let the slot outlive the ``async with`` block; the caller now owns
        ``release()``."""
        self._kept = True

    def release(self) -> None:
        """Give the slot back (the next waiter gets it); later calls do nothing."""
        if not self._released:
            self._released = True
            self._queue._release(time.monotonic() - self.granted_at)

    def __del__(self) -> None:
        # Safety net, not the normal path: a streamed response whose generator
        # never started (the client left before the first byte) never runs its
        # `finally`, and a lost slot would shrink the pool for good.
        if not self._released:
            with contextlib.suppress(Exception):
                self.release()
                log.warning("queue_slot_leaked", pool=self._queue.name)


class _Admission:
    """``async with queue.admit(...) as slot``: see ``PoolQueue.admit``."""

    __slots__ = ("_args", "_queue", "_slot")

    def __init__(
        self,
        queue: PoolQueue,
        args: tuple[PriorityClass, str, int, Receive | None],
    ) -> None:
        self._queue = queue
        self._args = args
        self._slot: Slot | None = None

    async def __aenter__(self) -> Slot:
        queue = self._queue
        if queue.in_flight < queue.capacity and not queue._scheduler:
            # The fast path of `acquire`, inlined: no second coroutine.
            queue.in_flight += 1
            self._slot = Slot(queue, self._args[0].name, 0.0, time.monotonic())
        else:
            self._slot = await queue.acquire(*self._args)
        return self._slot

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        slot = self._slot
        if slot is not None and (exc_type is not None or not slot._kept):
            slot.release()


class PoolQueue:
    """Slots and waiting requests of one model pool; one per pool per process.

    Lives on the event loop: no locks, and ``configure`` must be called from
    the loop too.
    """

    def __init__(self, name: str, capacity: int, classes: Iterable[PriorityClass]) -> None:
        self.name = name
        self.capacity = capacity
        self.in_flight = 0
        self._classes: dict[str, PriorityClass] = {}
        self._counters: dict[str, _Counters] = {}
        self._scheduler: FairScheduler[asyncio.Future[float]] = FairScheduler(())
        self._hold_s = _INITIAL_HOLD_S
        self.configure(capacity, classes)

    def configure(self, capacity: int, classes: Iterable[PriorityClass]) -> None:
        """Apply a new capacity and class set; queued requests keep their place.

        A larger capacity grants waiting requests at once; a smaller one lets
        in-flight requests finish and grants nothing until below it.
        """
        if capacity < 1:
            raise ValueError("a pool's capacity is at least 1")
        self.capacity = capacity
        classes = list(classes)
        for cls in classes:
            self._classes[cls.name] = cls
            self._counters.setdefault(cls.name, _Counters())
        self._scheduler.configure(_config(cls) for cls in classes)
        self._dispatch()

    def admit(
        self,
        priority: PriorityClass,
        tenant: str,
        cost: int,
        receive: Receive | None = None,
    ) -> _Admission:
        """An async context manager holding a slot (``acquire``) for its block."""
        return _Admission(self, (priority, tenant, cost, receive))

    async def acquire(
        self,
        priority: PriorityClass,
        tenant: str,
        cost: int,
        receive: Receive | None = None,
    ) -> Slot:
        """A slot for one request of ``tenant`` in class ``priority``, costing
        ``cost`` tokens (prompt + max_tokens estimate).

        Waits when the pool is full. ``receive`` (the request's ASGI receive,
        its body already read) is watched while waiting so a client that
        disconnects leaves the queue at once. Raises ServiceUnavailableError
        (queue full or wait over) or ClientClosedRequestError.
        """
        if self.in_flight < self.capacity and not self._scheduler:
            self.in_flight += 1
            return Slot(self, priority.name, 0.0, time.monotonic())
        return await self._wait(priority, tenant, max(1, cost), receive)

    def stats(self) -> PoolStats:
        """Queue depth and counters per class, capacity and slots in use."""
        depths = self._scheduler.depths()
        classes = {}
        for name, counters in self._counters.items():
            depth = depths.get(name, ClassDepth(0, 0, 0))
            classes[name] = ClassStats(
                num_queued=depth.num_queued,
                queued_tokens=depth.queued_tokens,
                num_tenants=depth.num_tenants,
                num_granted_after_wait=counters.granted,
                num_rejected_full=counters.rejected,
                num_timed_out=counters.timed_out,
                num_abandoned=counters.abandoned,
            )
        return PoolStats(self.name, self.capacity, self.in_flight, classes)

    def depth(self, class_name: str) -> int:
        """Requests of ``class_name`` waiting now."""
        return self._scheduler.depth(class_name).num_queued

    async def _wait(
        self, priority: PriorityClass, tenant: str, cost: int, receive: Receive | None
    ) -> Slot:
        name = priority.name
        if self._scheduler.class_config(name) is None:
            # A class the pool has not heard of: the request's policy snapshot
            # is newer than the last `configure` (a reload in progress).
            self._classes[name] = priority
            self._counters.setdefault(name, _Counters())
            self._scheduler.configure([_config(priority)])
        cls = self._classes[name]
        counters = self._counters[name]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[float] = loop.create_future()
        entry = QueueEntry(tenant, name, cost, future)
        enqueued_at = time.monotonic()
        pushed = self._scheduler.push(entry)
        if not pushed.accepted:
            counters.rejected += 1
            raise self._overloaded(cls, "queue_full")
        if pushed.evicted is not None:
            counters.rejected += 1
            pushed.evicted.waiter.set_exception(self._overloaded(cls, "queue_full"))
        watcher: asyncio.Future[None] | None = None
        try:
            async with asyncio.timeout(cls.max_queue_wait_s):
                if receive is None:
                    granted_at = await future
                else:
                    watcher = asyncio.ensure_future(_disconnected(receive))
                    await asyncio.wait((future, watcher), return_when=asyncio.FIRST_COMPLETED)
                    if not future.done():
                        raise ClientClosedRequestError("the client closed the request")
                    granted_at = future.result()
        except BaseException as exc:
            granted = future.done() and not future.cancelled() and future.exception() is None
            if not granted:
                self._scheduler.remove(entry)
                future.cancel()
            if isinstance(exc, TimeoutError):
                if granted:
                    # Granted in the same instant the deadline passed: serve it.
                    counters.granted += 1
                    return Slot(self, name, time.monotonic() - enqueued_at, future.result())
                counters.timed_out += 1
                raise self._overloaded(cls, "queue_timeout") from None
            if isinstance(exc, ServiceUnavailableError):
                raise  # pushed out of a full queue
            counters.abandoned += 1
            if granted:
                # The slot arrived as the client left: pass it on.
                self._release(0.0, count_hold=False)
            raise
        finally:
            if watcher is not None and not watcher.done():
                watcher.cancel()
        counters.granted += 1
        return Slot(self, name, granted_at - enqueued_at, granted_at)

    def _release(self, hold_s: float, *, count_hold: bool = True) -> None:
        if count_hold:
            self._hold_s += _HOLD_EWMA_ALPHA * (hold_s - self._hold_s)
        self.in_flight -= 1
        self._dispatch()

    def _dispatch(self) -> None:
        while self.in_flight < self.capacity:
            entry = self._scheduler.pop()
            if entry is None:
                return
            if entry.waiter.done():
                continue  # defensive: a finished waiter is never granted a slot
            self.in_flight += 1
            entry.waiter.set_result(time.monotonic())

    def _overloaded(self, cls: PriorityClass, code: str) -> ServiceUnavailableError:
        # Retry-After: how long the queue ahead takes to drain at the recent
        # slot hold time, within [1 s, the class's maximum wait].
        ahead = self._scheduler.depth(cls.name).num_queued + 1
        estimate = self._hold_s * ahead / self.capacity
        retry_after = min(max(1.0, estimate), max(1.0, cls.max_queue_wait_s))
        if code == "queue_full":
            message = f"the '{cls.name}' queue of this model is full; retry later"
        else:
            message = (
                f"no capacity for this model within the '{cls.name}' class's "
                f"maximum wait of {cls.max_queue_wait_s:g} s; retry later"
            )
        return ServiceUnavailableError(message, retry_after_s=math.ceil(retry_after), code=code)


def _config(cls: PriorityClass) -> ClassConfig:
    return ClassConfig(
        name=cls.name,
        weight=cls.weight,
        priority=cls.priority,
        max_queue_length=cls.max_queue_length,
    )


async def _disconnected(receive: Receive) -> None:
    """Return when the client disconnects; never, if that cannot be told."""
    # The body is already read, so the next ASGI message is the disconnect
    # (uvicorn never cancels a handler whose client left; it only says so here).
    try:
        message = await receive()
    except Exception:
        log.warning("queue_disconnect_watch_failed", exc_info=True)
    else:
        if message.get("type") == "http.disconnect":
            return
    # Something else, or a broken receive: wait for the slot or the deadline alone.
    await asyncio.get_running_loop().create_future()
