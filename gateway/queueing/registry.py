"""One ``PoolQueue`` per model pool, kept in step with the policy in force."""

from __future__ import annotations

from gateway.policy.compiled import Policy, Pool
from gateway.queueing.pool import PoolQueue, PoolStats


class PoolQueues:
    """The queues of every pool, by pool name.

    Built from the policy at start-up; ``configure`` applies a reloaded policy
    to the same queue objects, so requests already waiting keep their place
    and new requests see the new capacity and classes. A pool dropped from the
    policy keeps its queue until the process ends: requests that captured the
    old policy may still be using it.
    """

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._queues: dict[str, PoolQueue] = {}
        self.configure(policy)

    def configure(self, policy: Policy) -> None:
        """Apply ``policy``'s pools and priority classes (call on the event loop)."""
        self._policy = policy
        classes = list(policy.priority_classes.values())
        for name, pool in policy.pools.items():
            queue = self._queues.get(name)
            if queue is None:
                self._queues[name] = PoolQueue(name, pool.capacity, classes)
            else:
                queue.configure(pool.capacity, classes)

    def for_pool(self, pool: Pool) -> PoolQueue:
        """The queue of ``pool``, created on first use for a pool the last
        ``configure`` did not know (a request racing a reload)."""
        queue = self._queues.get(pool.name)
        if queue is None:
            classes = self._policy.priority_classes.values()
            queue = self._queues[pool.name] = PoolQueue(pool.name, pool.capacity, classes)
        return queue

    def stats(self) -> list[PoolStats]:
        """A snapshot of every pool's queue, by pool name."""
        return [self._queues[name].stats() for name in sorted(self._queues)]
