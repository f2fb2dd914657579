"""Which waiting request gets the next free slot of a pool: pure bookkeeping.

Two levels, both measured in tokens (the caller's estimate of prompt +
max_tokens, the same amount the quota reserves):

- between priority classes, stride scheduling (start-time fair queueing):
  each class has a virtual time, ``pass_``, that advances by
  ``cost / weight`` each time it is served; the backlogged class with the
  lowest pass goes next (ties: lower ``priority``, then name). Under
  saturation each class gets a share of tokens proportional to its weight, so
  interactive traffic overtakes batch traffic without starving it. A class
  that was idle rejoins at the current virtual time: idling banks no credit.
- within a class, deficit round robin across tenants: each visit to a tenant
  adds ``quantum`` tokens to its deficit, and it is served while its deficit
  covers the cost of its oldest request. Tenants share the class by tokens,
  whatever their request rates; a tenant that empties its queue loses its
  deficit.

A class's queue is bounded; when it is full, an arrival from a tenant with
fewer queued requests pushes out the newest request of the tenant with the
most, so a flood fills its own share of the queue and not everyone's.

No clocks, no asyncio: ``gateway.queueing.pool`` owns the waiting and the
deadlines. Every operation is O(1) apart from ``pop`` (O(classes + tenants)
in the worst case) and a push into a full class (O(tenants in the class)).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

W = TypeVar("W")

DEFAULT_QUANTUM = 16
"""Tokens a tenant's deficit grows by per round-robin visit. Small against any
request, so a tenant gets about one request per turn: with a large quantum a
tenant is served in bursts, and one that empties its queue within its burst
(a client with a few requests in flight) gets less than its share. Rounds in
which nobody can pay are skipped in one step, so a small quantum costs no
extra loops."""


@dataclass(frozen=True, slots=True)
class ClassConfig:
    """What the scheduler needs of a priority class."""

    name: str
    weight: float
    priority: int = 0
    max_queue_length: int = 1000


@dataclass(eq=False, slots=True)
class QueueEntry(Generic[W]):
    """One waiting request. Compared by identity: the same request twice is
    two entries."""

    tenant: str
    class_name: str
    cost: int
    waiter: W
    """Whatever the caller needs to wake the request (a future, in the gateway)."""


@dataclass(frozen=True, slots=True)
class PushResult(Generic[W]):
    """The outcome of ``FairScheduler.push``."""

    accepted: bool
    evicted: QueueEntry[W] | None = None
    """A request pushed out to make room; its waiter must be refused."""


@dataclass(frozen=True, slots=True)
class ClassDepth:
    """How much waits in one class right now."""

    num_queued: int
    queued_tokens: int
    num_tenants: int


@dataclass(eq=False, slots=True)
class _TenantQueue(Generic[W]):
    entries: OrderedDict[QueueEntry[W], None] = field(default_factory=OrderedDict)
    deficit: int = 0
    credited: bool = False
    """Whether this tenant already got its quantum on the current visit."""


@dataclass(eq=False, slots=True)
class _ClassQueue(Generic[W]):
    config: ClassConfig
    pass_: float = 0.0
    num_queued: int = 0
    queued_tokens: int = 0
    tenants: OrderedDict[str, _TenantQueue[W]] = field(default_factory=OrderedDict)
    """Backlogged tenants in round-robin order; the first is being visited."""


class FairScheduler(Generic[W]):
    """Weighted fair queueing between classes, deficit round robin between
    tenants within a class; see the module docstring."""

    def __init__(self, classes: Iterable[ClassConfig], *, quantum: int = DEFAULT_QUANTUM) -> None:
        if quantum < 1:
            raise ValueError("quantum must be at least 1 token")
        self.quantum = quantum
        self._classes: dict[str, _ClassQueue[W]] = {}
        self._vtime = 0.0
        self._num_queued = 0
        self.configure(classes)

    def configure(self, classes: Iterable[ClassConfig]) -> None:
        """Add or update classes; queued requests stay where they are.

        A class missing from ``classes`` keeps its last configuration, so the
        requests already queued in it are still served.
        """
        for config in classes:
            if config.weight <= 0:
                raise ValueError(f"class {config.name!r}: weight must be positive")
            existing = self._classes.get(config.name)
            if existing is None:
                self._classes[config.name] = _ClassQueue(config, pass_=self._vtime)
            else:
                existing.config = config

    def __len__(self) -> int:
        return self._num_queued

    def __bool__(self) -> bool:
        return self._num_queued > 0

    def class_config(self, name: str) -> ClassConfig | None:
        """The configuration of class ``name``, or None if it was never configured."""
        queue = self._classes.get(name)
        return None if queue is None else queue.config

    def depth(self, class_name: str) -> ClassDepth:
        """What waits in ``class_name`` (zeros for an unknown class)."""
        queue = self._classes.get(class_name)
        if queue is None:
            return ClassDepth(0, 0, 0)
        return ClassDepth(queue.num_queued, queue.queued_tokens, len(queue.tenants))

    def depths(self) -> Mapping[str, ClassDepth]:
        """``depth`` of every known class."""
        return {name: self.depth(name) for name in self._classes}

    def tenant_depth(self, class_name: str, tenant: str) -> int:
        """How many of ``tenant``'s requests wait in ``class_name``."""
        queue = self._classes.get(class_name)
        tq = None if queue is None else queue.tenants.get(tenant)
        return 0 if tq is None else len(tq.entries)

    def push(self, entry: QueueEntry[W]) -> PushResult[W]:
        """Queue ``entry`` behind its tenant's earlier requests.

        Refused (``accepted`` False) when its class is full and no other
        tenant holds at least two more queued requests than this one; else,
        when full, that tenant's newest request is evicted to make room.
        The class must have been configured.
        """
        queue = self._classes.get(entry.class_name)
        if queue is None:
            raise KeyError(f"unknown priority class {entry.class_name!r}")
        evicted: QueueEntry[W] | None = None
        if queue.num_queued >= queue.config.max_queue_length:
            evicted = self._evict_for(queue, entry.tenant)
            if evicted is None:
                return PushResult(accepted=False)
        if queue.num_queued == 0:
            # Rejoin at the present: time spent idle is not credit.
            queue.pass_ = max(queue.pass_, self._vtime)
        tq = queue.tenants.get(entry.tenant)
        if tq is None:
            tq = queue.tenants[entry.tenant] = _TenantQueue()
        tq.entries[entry] = None
        queue.num_queued += 1
        queue.queued_tokens += entry.cost
        self._num_queued += 1
        return PushResult(accepted=True, evicted=evicted)

    def remove(self, entry: QueueEntry[W]) -> bool:
        """Take ``entry`` out (its client left); False if it is not queued."""
        queue = self._classes.get(entry.class_name)
        tq = None if queue is None else queue.tenants.get(entry.tenant)
        if queue is None or tq is None or entry not in tq.entries:
            return False
        del tq.entries[entry]
        self._forget(queue, entry, tq)
        return True

    def pop(self) -> QueueEntry[W] | None:
        """The request to serve next, taken out of the queue; None when empty."""
        if not self._num_queued:
            return None
        best: _ClassQueue[W] | None = None
        for queue in self._classes.values():
            if queue.num_queued and (
                best is None
                or (queue.pass_, queue.config.priority, queue.config.name)
                < (best.pass_, best.config.priority, best.config.name)
            ):
                best = queue
        assert best is not None
        entry = self._pop_tenant_round(best)
        self._vtime = best.pass_
        best.pass_ += entry.cost / best.config.weight
        return entry

    def __iter__(self) -> Iterator[QueueEntry[W]]:
        """Every queued entry (no particular order); for draining on shutdown."""
        for queue in self._classes.values():
            for tq in queue.tenants.values():
                yield from tq.entries

    def _pop_tenant_round(self, queue: _ClassQueue[W]) -> QueueEntry[W]:
        fruitless = 0
        while True:
            tenant, tq = next(iter(queue.tenants.items()))
            if not tq.credited:
                tq.deficit += self.quantum
                tq.credited = True
            head = next(iter(tq.entries))
            if head.cost <= tq.deficit:
                tq.deficit -= head.cost
                del tq.entries[head]
                self._forget(queue, head, tq)
                return head
            tq.credited = False
            queue.tenants.move_to_end(tenant)
            fruitless += 1
            if fruitless >= len(queue.tenants):
                # A whole round served nobody (costs above the quantum). Grant
                # the rounds still needed before someone can pay, minus one,
                # at once: the same outcome as looping, in O(tenants).
                rounds = min(
                    -(-(next(iter(t.entries)).cost - t.deficit) // self.quantum)
                    for t in queue.tenants.values()
                )
                if rounds > 1:
                    for t in queue.tenants.values():
                        t.deficit += (rounds - 1) * self.quantum
                fruitless = 0

    def _forget(self, queue: _ClassQueue[W], entry: QueueEntry[W], tq: _TenantQueue[W]) -> None:
        queue.num_queued -= 1
        queue.queued_tokens -= entry.cost
        self._num_queued -= 1
        if not tq.entries:
            # DRR: an emptied queue leaves the round and loses its deficit.
            del queue.tenants[entry.tenant]

    def _evict_for(self, queue: _ClassQueue[W], tenant: str) -> QueueEntry[W] | None:
        own = queue.tenants.get(tenant)
        own_count = 0 if own is None else len(own.entries)
        victim_name, victim = max(queue.tenants.items(), key=lambda item: len(item[1].entries))
        # Two more, not one: evicting from a tenant only one ahead would just
        # swap who is ahead, churning requests for no fairness gained.
        if victim_name == tenant or len(victim.entries) < own_count + 2:
            return None
        entry, _ = victim.entries.popitem(last=True)
        self._forget(queue, entry, victim)
        return entry
