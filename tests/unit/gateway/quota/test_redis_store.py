"""What only the Redis store has: server time, key layout, dead servers."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.crc import key_slot

from gateway.policy.compiled import Limits, LimitSet
from gateway.quota.breaker import CircuitBreaker, GuardedStore
from gateway.quota.redis_store import RedisQuotaStore, connect
from gateway.quota.store import StoreUnavailableError
from tests.support.processes import RedisServer
from tests.unit.gateway.quota.conftest import ask, limits, make_tenant


async def test_every_key_of_a_tenant_is_in_one_cluster_slot(redis_server: RedisServer) -> None:
    client = connect(redis_server.url, timeout_s=2.0)
    store = RedisQuotaStore(client, lease_ttl_s=60)
    tenant = make_tenant(
        limits(requests_per_minute=10, max_concurrent=5, tokens_per_day=10**6),
        overrides={"big": limits(tokens_per_minute=1000, tokens_per_month=10**7)},
        apps={"bot": LimitSet(Limits(tokens_per_minute=500), {"big": Limits(max_concurrent=1)})},  # type: ignore[arg-type]
        tenant_id="acme",
    )
    lease = (await store.admit(ask(tenant, 10, app="bot", model="big"))).lease
    assert lease is not None
    keys = [k.decode() for k in await client.keys("*")]
    assert len(keys) >= 8
    assert all(k.startswith("tollgate:q:{acme}:") for k in keys)
    assert {key_slot(k.encode()) for k in keys} == {key_slot(b"{acme}")}
    assert await store.settle(lease, 5)
    # Finished leases leave no lease bookkeeping and no concurrency counters.
    left = {k.decode() for k in await client.keys("*")}
    assert not any(k.endswith(("leases", "lease_exp", ":conc")) for k in left)
    await store.close()


async def test_the_store_runs_over_a_unix_socket_url(redis_server: RedisServer) -> None:
    # A Redis on the same host: unix:// gives the scripts' connections the
    # same settings as TCP does (tested by admitting past a limit over it).
    store = RedisQuotaStore(connect(redis_server.unix_url, timeout_s=2.0), lease_ttl_s=60)
    tenant = make_tenant(limits(tokens_per_minute=100))
    first = await store.admit(ask(tenant, 60))
    assert first.allowed and first.lease is not None
    assert not (await store.admit(ask(tenant, 60))).allowed
    assert await store.settle(first.lease, 10)
    assert (await store.admit(ask(tenant, 60))).allowed
    await store.close()


async def test_scripts_use_redis_time_for_lease_expiry(redis_server: RedisServer) -> None:
    store = RedisQuotaStore(connect(redis_server.url, timeout_s=2.0), lease_ttl_s=0.3)
    tenant = make_tenant(limits(max_concurrent=1))
    assert (await store.admit(ask(tenant, 1))).allowed
    assert not (await store.admit(ask(tenant, 1))).allowed
    await asyncio.sleep(0.4)
    assert (await store.admit(ask(tenant, 1))).allowed
    await store.close()


async def test_scripts_are_reloaded_after_a_script_flush(redis_server: RedisServer) -> None:
    client = connect(redis_server.url, timeout_s=2.0)
    store = RedisQuotaStore(client, lease_ttl_s=60)
    tenant = make_tenant(limits(tokens_per_minute=100))
    assert (await store.admit(ask(tenant, 10))).allowed
    await client.script_flush()
    assert (await store.admit(ask(tenant, 10))).allowed
    await store.close()


async def test_a_dead_redis_fails_fast_and_recovery_is_automatic(
    redis_server: RedisServer,
) -> None:
    store = GuardedStore(
        RedisQuotaStore(connect(redis_server.url, timeout_s=0.1), lease_ttl_s=60),
        CircuitBreaker(failure_threshold=2, reset_after_s=0.3),
        timeout_s=0.2,
    )
    tenant = make_tenant(limits(tokens_per_minute=100))
    assert (await store.admit(ask(tenant, 10))).allowed
    redis_server.stop()
    for _ in range(5):
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            await store.admit(ask(tenant, 10))
        assert time.monotonic() - started < 0.5
    assert store.breaker.state in ("open", "half_open")
    redis_server.start()
    await asyncio.sleep(0.35)
    assert (await store.admit(ask(tenant, 10))).allowed
    assert store.breaker.state == "closed"
    await store.close()
