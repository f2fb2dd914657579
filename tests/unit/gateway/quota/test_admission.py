"""Admission of one request: per-request limits, refusals, store failures,
and grants that are finished exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.errors import (
    BadRequestError,
    RateLimitError,
    ServiceUnavailableError,
    UpstreamTimeoutError,
)
from gateway.policy.compiled import (
    ModelRoute,
    Policy,
    Pool,
    Pricing,
    PriorityClass,
    TenantPolicy,
    UpstreamTimeouts,
)
from gateway.quota.admission import Quota
from gateway.quota.keeper import LeaseKeeper
from gateway.quota.limits import Reservation, Scope, scopes_for
from gateway.quota.memory import MemoryQuotaStore
from gateway.quota.store import Admission, Lease, ScopeUsage, StoreUnavailableError
from gateway.settings import GatewaySettings
from gateway.usage.record import UsageEntry
from tests.unit.gateway.quota.conftest import FakeClock, limits, make_tenant

ROUTE = ModelRoute("m", "m", "small", 1000, Pool("p", "tollgate", (), UpstreamTimeouts(1, 1, 1, 5)))
POLICY = Policy(
    version="v",
    loaded_at=datetime.now(UTC),
    tenants={},
    models={"m": ROUTE},
    pools={},
    priority_classes={"standard": PriorityClass("standard", 0, 7.0)},
    pricing=Pricing("USD", {}),
)


def chat(text: str = "abcd", **fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **fields}


PROMPT = 3 + 4 + 1  # the estimate for chat("abcd")


class RecordingStore(MemoryQuotaStore):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__(lease_ttl_s=30, clock=clock)
        self.finishes: list[tuple[str, int | None]] = []
        self.failing = False

    async def admit(self, reservation: Reservation) -> Admission:
        if self.failing:
            raise StoreUnavailableError("down", retry_after_s=2.5)
        return await super().admit(reservation)

    async def settle(
        self, lease: Lease, actual_tokens: int, usage: UsageEntry | None = None
    ) -> bool:
        if self.failing:
            raise StoreUnavailableError("down")
        self.finishes.append(("settle", actual_tokens))
        return await super().settle(lease, actual_tokens, usage)

    async def release(self, lease: Lease, usage: UsageEntry | None = None) -> bool:
        if self.failing:
            raise StoreUnavailableError("down")
        self.finishes.append(("release", None))
        return await super().release(lease, usage)

    async def append(self, tenant_id: str, usage: UsageEntry) -> None:
        if self.failing:
            raise StoreUnavailableError("down")
        await super().append(tenant_id, usage)

    async def renew(self, leases: Sequence[Lease]) -> int:
        self.finishes.append(("renew", len(leases)))
        return await super().renew(leases)


@pytest.fixture
def store(clock: FakeClock) -> RecordingStore:
    return RecordingStore(clock)


@pytest.fixture
def quota(store: RecordingStore) -> Quota:
    return Quota(store, lease_ttl_s=30)


async def usage(quota: Quota, tenant: TenantPolicy) -> ScopeUsage:
    scope: Scope = scopes_for(tenant, None, "m")[0]
    return await quota.store.peek(scope)


async def test_a_prompt_over_the_limit_is_a_400(quota: Quota) -> None:
    tenant = make_tenant(limits(max_prompt_tokens=5, tokens_per_minute=100))
    with pytest.raises(BadRequestError) as info:
        await quota.admit(POLICY, tenant, None, ROUTE, chat(), "chat")
    assert info.value.code == "context_length_exceeded"
    assert info.value.param == "messages"
    assert "max_prompt_tokens" in info.value.message


async def test_max_output_tokens_is_the_default_max_tokens(quota: Quota) -> None:
    tenant = make_tenant(limits(max_output_tokens=50, tokens_per_minute=1000))
    body = chat()
    grant = await quota.admit(POLICY, tenant, None, ROUTE, body, "chat")
    assert body["max_tokens"] == 50
    assert grant.reserved_tokens == PROMPT + 50
    assert (await usage(quota, tenant)).tokens == PROMPT + 50


async def test_asking_for_more_than_max_output_tokens_is_a_400(quota: Quota) -> None:
    tenant = make_tenant(limits(max_output_tokens=50))
    with pytest.raises(BadRequestError) as info:
        await quota.admit(POLICY, tenant, None, ROUTE, chat(max_tokens=51), "chat")
    assert (info.value.code, info.value.param) == ("max_tokens_exceeded", "max_tokens")
    # max_completion_tokens wins over max_tokens, as in the backend.
    body = chat(max_tokens=500, max_completion_tokens=20)
    grant = await quota.admit(POLICY, tenant, None, ROUTE, body, "chat")
    assert grant.reserved_tokens == PROMPT + 20


async def test_without_any_output_limit_the_rest_of_the_context_is_reserved(quota: Quota) -> None:
    tenant = make_tenant(limits(tokens_per_day=10**6))
    body = chat()
    grant = await quota.admit(POLICY, tenant, None, ROUTE, body, "chat")
    assert grant.reserved_tokens == ROUTE.context_length
    assert "max_tokens" not in body


async def test_a_refusal_is_an_openai_429(quota: Quota) -> None:
    tenant = make_tenant(limits(tokens_per_minute=100, requests_per_minute=10))
    grant = await quota.admit(POLICY, tenant, None, ROUTE, chat(max_tokens=60), "chat")
    assert grant.headers["x-ratelimit-remaining-tokens"] == str(100 - PROMPT - 60)
    assert grant.headers["x-ratelimit-remaining-requests"] == "9"
    with pytest.raises(RateLimitError) as info:
        await quota.admit(POLICY, tenant, None, ROUTE, chat(max_tokens=60), "chat")
    error = info.value
    assert (error.code, error.error_type) == ("rate_limit_exceeded", "tokens")
    assert error.headers["retry-after"] == "60"
    assert error.headers["x-ratelimit-limit-tokens"] == "100"
    assert error.message.startswith(f"Rate limit reached for tenant '{tenant.tenant_id}'")


async def test_an_exhausted_budget_is_insufficient_quota(quota: Quota) -> None:
    tenant = make_tenant(limits(tokens_per_day=20))
    with pytest.raises(RateLimitError) as info:
        await quota.admit(POLICY, tenant, None, ROUTE, chat(max_tokens=100), "chat")
    assert (info.value.code, info.value.error_type) == ("insufficient_quota", "insufficient_quota")
    assert "Request too large" in info.value.message


async def test_a_tenant_without_limits_never_touches_the_store(
    quota: Quota, store: RecordingStore
) -> None:
    store.failing = True
    grant = await quota.admit(POLICY, make_tenant(), None, ROUTE, chat(), "chat")
    assert grant.lease is None and grant.headers == {}


async def test_store_failure_follows_the_tenants_policy(
    quota: Quota, store: RecordingStore
) -> None:
    store.failing = True
    closed = make_tenant(limits(tokens_per_minute=100))
    with pytest.raises(ServiceUnavailableError) as info:
        await quota.admit(POLICY, closed, None, ROUTE, chat(max_tokens=1), "chat")
    assert info.value.code == "quota_unavailable"
    assert info.value.headers["retry-after"] == "3"
    opened = make_tenant(limits(tokens_per_minute=100), on_store_failure="fail_open")
    grant = await quota.admit(POLICY, opened, None, ROUTE, chat(max_tokens=1), "chat")
    assert grant.lease is None and quota.fail_open_admits == 1
    await grant.settle(10)  # nothing to settle, nothing raised


async def test_a_grant_is_finished_exactly_once(quota: Quota, store: RecordingStore) -> None:
    tenant = make_tenant(limits(tokens_per_minute=100))
    grant = await quota.admit(POLICY, tenant, None, ROUTE, chat(max_tokens=10), "chat")
    await grant.settle(7)
    await grant.settle(7)
    grant.settle_soon(None)
    grant.finish_after_error(UpstreamTimeoutError("late"))
    await grant.release()
    await asyncio.sleep(0)
    assert store.finishes == [("settle", 7)]
    assert (await usage(quota, tenant)).tokens == 7


@pytest.mark.parametrize(
    ("error", "sent", "expected"),
    [
        (BadRequestError("backend refused"), True, ("release", None)),
        (ServiceUnavailableError("no replica"), True, ("release", None)),
        (RateLimitError("queue full", retry_after_s=1), False, ("release", None)),
        (UpstreamTimeoutError("slow"), True, ("settle", PROMPT + 10)),
        (asyncio.CancelledError(), True, ("settle", PROMPT + 10)),
        (asyncio.CancelledError(), False, ("release", None)),
    ],
)
async def test_errors_release_or_charge_the_reservation(
    quota: Quota,
    store: RecordingStore,
    error: BaseException,
    sent: bool,
    expected: tuple[str, int | None],
) -> None:
    tenant = make_tenant(limits(tokens_per_minute=100))
    grant = await quota.admit(POLICY, tenant, None, ROUTE, chat(max_tokens=10), "chat")
    grant.sent = sent
    grant.finish_after_error(error)
    await quota.keeper.stop()
    assert store.finishes == [expected]
    if hasattr(error, "headers"):
        assert error.headers["x-ratelimit-limit-tokens"] == "100"


async def test_settlement_survives_the_callers_cancellation(
    quota: Quota, store: RecordingStore
) -> None:
    tenant = make_tenant(limits(max_concurrent=1))
    grant = await quota.admit(POLICY, tenant, None, ROUTE, chat(max_tokens=10), "chat")
    task = asyncio.create_task(grant.settle(5))
    await asyncio.sleep(0)
    task.cancel()
    await quota.keeper.stop()
    assert store.finishes == [("settle", 5)]
    assert (await usage(quota, tenant)).concurrent == 0


async def test_the_keeper_renews_and_retries(store: RecordingStore, clock: FakeClock) -> None:
    monotonic = FakeClock(0.0)
    keeper = LeaseKeeper(store, lease_ttl_s=30, clock=monotonic)
    quota = Quota(store, lease_ttl_s=30, keeper=keeper)
    tenant = make_tenant(limits(max_concurrent=5))
    grant = await quota.admit(POLICY, tenant, None, ROUTE, chat(max_tokens=10), "chat")
    await keeper.tick()
    assert store.finishes == [("renew", 1)]
    # Past the horizon (queue wait 7 + upstream 5 + TTL 30) renewal stops.
    monotonic.advance(43)
    await keeper.tick()
    assert store.finishes == [("renew", 1)] and keeper.live == 0
    store.failing = True
    await grant.settle(9)
    assert store.finishes == [("renew", 1)]
    store.failing = False
    await keeper.tick()
    assert store.finishes == [("renew", 1), ("settle", 9)]
    assert (await usage(quota, tenant)).concurrent == 0


def test_the_memory_store_refuses_several_workers() -> None:
    with pytest.raises(ValueError, match="TOLLGATE_STORE=redis"):
        GatewaySettings.from_env({"TOLLGATE_WORKERS": "4"})
    settings = GatewaySettings.from_env(
        {"TOLLGATE_WORKERS": "4", "TOLLGATE_STORE": "redis", "TOLLGATE_REDIS_URL": "redis://x:1/0"}
    )
    assert (settings.workers, settings.store, settings.quota_lease_ttl_s) == (4, "redis", 60.0)
