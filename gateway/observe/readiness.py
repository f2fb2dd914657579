"""The checks behind ``GET /readyz``: may this process take traffic now?

Ready when all three hold:

- ``policy``: a policy is loaded (the last good one stays in force when a
  reload fails, so a rejected edit does not make the gateway unready);
- ``quota_store``: the store answers. In memory it always does; a remote
  store must answer a ``ping`` through its circuit breaker, so an open
  circuit fails at once and a closed one costs one round trip, bounded by
  the store's call deadline;
- ``pool:<name>``: every pool the policy marks ``required: true`` has a
  replica that is healthy, not drained, and (when the pool has probes) has
  passed a probe since this process started: a gateway that has not yet
  seen its backend up does not claim to be ready.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.policy.compiled import Policy, Pool
from gateway.policy.watcher import PolicyWatcher
from gateway.quota.store import QuotaStore, StoreUnavailableError
from gateway.upstream.health import ReplicaBook


@dataclass(frozen=True, slots=True)
class Check:
    """The outcome of one readiness check."""

    name: str
    ok: bool
    detail: str


def check_policy(watcher: PolicyWatcher) -> tuple[Check, Policy | None]:
    """Whether a policy is in force (and the policy, for the pool checks)."""
    try:
        policy = watcher.current
    except RuntimeError:
        return Check("policy", False, "no policy loaded"), None
    detail = f"version {policy.version}"
    if watcher.last_error is not None:
        detail += " (the last reload was rejected; this one stays in force)"
    return Check("policy", True, detail), policy


async def check_store(store: QuotaStore) -> Check:
    """Whether the quota store answers a ping."""
    try:
        await store.ping()
    except StoreUnavailableError as exc:
        return Check("quota_store", False, str(exc))
    except Exception as exc:
        # An unguarded store raises its client's own errors.
        return Check("quota_store", False, f"the quota store failed: {type(exc).__name__}")
    return Check("quota_store", True, "answers")


def check_pool(book: ReplicaBook, pool: Pool, now: float | None = None) -> Check:
    """Whether ``pool`` has a replica that may take requests and has been seen up."""
    now = time.monotonic() if now is None else now
    live = [r for r in pool.replicas if r.weight > 0]
    up = 0
    for replica in live:
        state = book.state(replica.url, pool)
        if state.routable(now) and (state.seen_up or not state.has_probes):
            up += 1
    name = f"pool:{pool.name}"
    if up:
        return Check(name, True, f"{up} of {len(live)} replicas healthy")
    return Check(name, False, f"no healthy replica (0 of {len(live)})")


def check_pools(book: ReplicaBook, pools: Iterable[Pool]) -> list[Check]:
    """``check_pool`` for every pool marked ``required``, by name."""
    now = time.monotonic()
    return [
        check_pool(book, pool, now) for pool in sorted(pools, key=lambda p: p.name) if pool.required
    ]
