"""The readiness checks on their own: required pools, seen-up replicas, the store."""

from __future__ import annotations

import dataclasses
import time

from gateway.observe.readiness import check_pool, check_pools, check_store
from gateway.policy.compiled import Policy, Pool, Replica
from gateway.quota.breaker import CircuitBreaker, GuardedStore
from gateway.quota.memory import MemoryQuotaStore
from gateway.quota.redis_store import RedisQuotaStore, connect
from gateway.upstream.health import ReplicaBook
from tests.support.processes import free_port


def local(policy: Policy, **changes: object) -> Pool:
    return dataclasses.replace(policy.pools["local"], **changes)  # type: ignore[arg-type]


def test_a_replica_counts_once_a_probe_has_passed(policy: Policy) -> None:
    pool = local(policy)
    book = ReplicaBook(policy)
    state = book.state(pool.replicas[0].url, pool)
    now = time.monotonic()
    check = check_pool(book, pool, now)
    assert (check.name, check.ok) == ("pool:local", False)
    state.record_success(now, probe=True)
    assert check_pool(book, pool, now).ok


def test_an_ejected_or_drained_replica_does_not_count(policy: Policy) -> None:
    pool = local(policy)
    book = ReplicaBook(policy)
    state = book.state(pool.replicas[0].url, pool)
    now = time.monotonic()
    state.record_success(now, probe=True)
    for _ in range(state.config.failures_to_eject):
        state.record_failure(now, "GET /health: ConnectError", probe=True)
    assert not check_pool(book, pool, now).ok
    drained = local(policy, replicas=(Replica(pool.replicas[0].url, weight=0),))
    assert check_pool(ReplicaBook(policy), drained, now).detail == "no healthy replica (0 of 0)"


def test_a_pool_without_probes_counts_while_routable(policy: Policy) -> None:
    pool = local(policy)
    no_probes = dataclasses.replace(pool.health, liveness_path=None, readiness_path=None)
    quiet = local(policy, health=no_probes)
    book = ReplicaBook(dataclasses.replace(policy, pools={"local": quiet}))
    assert check_pool(book, quiet).ok


def test_only_required_pools_are_checked(policy: Policy) -> None:
    book = ReplicaBook(policy)
    required = local(policy)
    optional = local(policy, name="spare", required=False)
    assert required.required
    assert [c.name for c in check_pools(book, [optional, required])] == ["pool:local"]


async def test_the_memory_store_always_answers() -> None:
    check = await check_store(MemoryQuotaStore(lease_ttl_s=10))
    assert (check.name, check.ok) == ("quota_store", True)


async def test_an_unreachable_redis_fails_and_then_fails_fast() -> None:
    inner = RedisQuotaStore(
        connect(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2), lease_ttl_s=10
    )
    store = GuardedStore(inner, CircuitBreaker(failure_threshold=1), timeout_s=0.5)
    try:
        first = await check_store(store)
        assert not first.ok and "quota store failed" in first.detail
        second = await check_store(store)
        assert not second.ok and "circuit open" in second.detail
    finally:
        await store.close()
