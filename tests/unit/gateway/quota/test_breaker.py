"""The circuit breaker and the time-bounded store around a remote store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from gateway.quota.breaker import CircuitBreaker, GuardedStore
from gateway.quota.limits import Reservation, Scope
from gateway.quota.store import Admission, Lease, ScopeUsage, StoreUnavailableError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FlakyStore:
    """Hangs or fails on demand."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.calls = 0

    async def _go(self) -> None:
        self.calls += 1
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "fail":
            raise ConnectionError("refused")

    async def admit(self, reservation: Reservation) -> Admission:
        await self._go()
        return Admission(Lease(reservation.tenant_id, reservation.lease_id, reservation.tokens))

    async def settle(self, lease: Lease, actual_tokens: int, usage: object = None) -> bool:
        await self._go()
        return True

    async def release(self, lease: Lease, usage: object = None) -> bool:
        await self._go()
        return True

    async def append(self, tenant_id: str, usage: object) -> None:
        await self._go()

    async def sweep(self) -> int:
        return 0

    async def renew(self, leases: Sequence[Lease]) -> int:
        await self._go()
        return len(leases)

    async def peek(self, scope: Scope) -> ScopeUsage:
        await self._go()
        return ScopeUsage(0, 0, 0, 0, 0)

    async def ping(self) -> None:
        await self._go()

    async def close(self) -> None:
        pass


def test_opens_after_consecutive_failures_and_recovers_through_one_probe() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=3, reset_after_s=2.0, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.failed()
    assert breaker.state == "closed"
    breaker.succeeded()  # a success resets the count
    for _ in range(3):
        assert breaker.allow()
        breaker.failed()
    assert breaker.state == "open" and not breaker.allow()
    assert breaker.retry_after_s() == 2.0
    clock.now = 2.0
    assert breaker.state == "half_open"
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one at a time
    breaker.failed()  # a failed probe reopens at once
    assert breaker.state == "open"
    clock.now = 4.0
    assert breaker.allow()
    breaker.succeeded()
    assert breaker.state == "closed" and breaker.allow()


RESERVATION = Reservation("t", "lease", 10, ())


async def test_a_hanging_store_is_abandoned_within_the_timeout() -> None:
    inner = FlakyStore()
    inner.mode = "hang"
    store = GuardedStore(inner, CircuitBreaker(failure_threshold=2), timeout_s=0.05)
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as info:
        await store.admit(RESERVATION)
    assert time.monotonic() - started < 0.5
    assert info.value.attempted


async def test_an_open_circuit_fails_fast_without_calling() -> None:
    inner = FlakyStore()
    inner.mode = "fail"
    clock = Clock()
    store = GuardedStore(
        inner, CircuitBreaker(failure_threshold=2, reset_after_s=1.0, clock=clock), timeout_s=1.0
    )
    for _ in range(2):
        with pytest.raises(StoreUnavailableError):
            await store.settle(Lease("t", "l", 1), 1)
    calls = inner.calls
    with pytest.raises(StoreUnavailableError) as info:
        await store.admit(RESERVATION)
    assert inner.calls == calls and not info.value.attempted
    assert info.value.retry_after_s == pytest.approx(1.0)
    inner.mode = "ok"
    clock.now = 1.0
    assert (await store.admit(RESERVATION)).allowed
    assert store.breaker.state == "closed"


async def test_a_cancelled_probe_frees_the_half_open_slot() -> None:
    inner = FlakyStore()
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, reset_after_s=1.0, clock=clock)
    store = GuardedStore(inner, breaker, timeout_s=10)
    inner.mode = "fail"
    with pytest.raises(StoreUnavailableError):
        await store.admit(RESERVATION)
    clock.now = 1.0
    inner.mode = "hang"
    task = asyncio.create_task(store.admit(RESERVATION))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    inner.mode = "ok"
    assert (await store.admit(RESERVATION)).allowed


def test_trips_count_outages_not_failed_probes() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=2, reset_after_s=1.0, clock=clock)
    assert breaker.trips == 0
    for _ in range(2):
        breaker.allow()
        breaker.failed()
    assert breaker.state == "open" and breaker.trips == 1
    clock.now = 1.0
    assert breaker.allow()
    breaker.failed()  # the probe fails: still the same outage
    assert breaker.state == "open" and breaker.trips == 1
    clock.now = 2.0
    assert breaker.allow()
    breaker.succeeded()
    for _ in range(2):
        breaker.allow()
        breaker.failed()
    assert breaker.trips == 2


async def test_ping_goes_through_the_breaker() -> None:
    inner = FlakyStore()
    clock = Clock()
    store = GuardedStore(
        inner, CircuitBreaker(failure_threshold=1, reset_after_s=1.0, clock=clock), timeout_s=1.0
    )
    await store.ping()
    inner.mode = "fail"
    with pytest.raises(StoreUnavailableError) as info:
        await store.ping()
    assert info.value.attempted and store.breaker.state == "open"
    calls = inner.calls
    with pytest.raises(StoreUnavailableError) as info:
        await store.ping()
    assert not info.value.attempted and inner.calls == calls
