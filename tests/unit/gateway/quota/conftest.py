"""Fixtures for the quota store contract suite: one fake clock, and every
store built on it (memory, and Redis on a real redis-server)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gateway.policy.compiled import AppPolicy, Limits, LimitSet, TenantPolicy
from gateway.quota.limits import Reservation, reservation_for
from gateway.quota.memory import MemoryQuotaStore
from gateway.quota.redis_store import RedisQuotaStore, connect
from gateway.quota.store import QuotaStore
from tests.support.processes import RedisServer

TTL_S = 10.0


class FakeClock:
    """Unix time that only moves when a test says so."""

    def __init__(self, start: float = 1_750_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def set_local(self, zone: str, *args: int) -> None:
        """Jump to a wall-clock time in `zone`: set_local("UTC", 2025, 1, 31, 23, 59)."""
        self.now = datetime(*args, tzinfo=ZoneInfo(zone)).timestamp()  # type: ignore[arg-type,misc]


@pytest.fixture(scope="module")
def redis_module() -> Iterator[RedisServer]:
    """One redis-server for a test module (tests use fresh tenant ids)."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[QuotaStore]:
    """Each contract test runs once per store, both on the fake clock."""
    if request.param == "memory":
        yield MemoryQuotaStore(lease_ttl_s=TTL_S, clock=clock)
        return
    server: RedisServer = request.getfixturevalue("redis_module")
    redis_store = RedisQuotaStore(
        connect(server.url, timeout_s=2.0), lease_ttl_s=TTL_S, clock=clock
    )
    try:
        yield redis_store
    finally:
        await redis_store.close()


def limits(**values: Any) -> Limits:
    return Limits(**values)


def make_tenant(
    base: Limits | None = None,
    *,
    overrides: dict[str, Limits] | None = None,
    apps: dict[str, LimitSet] | None = None,
    tenant_id: str | None = None,
    on_store_failure: str = "fail_closed",
) -> TenantPolicy:
    """A tenant with a fresh id (so tests sharing one Redis never collide)."""
    tid = tenant_id or f"t{uuid.uuid4().hex[:12]}"
    return TenantPolicy(
        tenant_id=tid,
        display_name=tid,
        tier="standard",
        enabled=True,
        all_models=True,
        allowed_models=frozenset(),
        default_priority="standard",
        allowed_priorities=("standard",),
        limits=LimitSet(base or Limits(), MappingProxyType(dict(overrides or {}))),
        on_store_failure=on_store_failure,  # type: ignore[arg-type]
        apps=MappingProxyType(
            {name: AppPolicy(name, limit_set) for name, limit_set in (apps or {}).items()}
        ),
    )


def ask(
    tenant: TenantPolicy, tokens: int, *, app: str | None = None, model: str = "m"
) -> Reservation:
    return reservation_for(tenant, app, model, tokens)
