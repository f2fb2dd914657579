"""Every refusal of admission names the limit that refused it to the
`Quota.on_denial` hooks (the metrics' `tollgate_quota_denials_total`)."""

from __future__ import annotations

import pytest

from gateway.errors import BadRequestError, GatewayError, RateLimitError, ServiceUnavailableError
from gateway.policy.compiled import Limits
from gateway.quota.admission import DENIAL_REASONS, Quota
from gateway.quota.limits import COUNTED
from tests.unit.gateway.quota.conftest import FakeClock, limits, make_tenant
from tests.unit.gateway.quota.test_admission import POLICY, ROUTE, RecordingStore, chat


@pytest.fixture
def denials(quota: Quota) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    quota.on_denial.append(lambda tenant, reason: seen.append((tenant, reason)))
    return seen


@pytest.fixture
def store(clock: FakeClock) -> RecordingStore:
    return RecordingStore(clock)


@pytest.fixture
def quota(store: RecordingStore) -> Quota:
    return Quota(store, lease_ttl_s=30)


def test_the_reasons_are_the_counted_limits_and_the_rest() -> None:
    assert set(COUNTED) < set(DENIAL_REASONS)
    assert set(DENIAL_REASONS) - set(COUNTED) == {
        "max_prompt_tokens",
        "max_output_tokens",
        "store_unavailable",
    }


@pytest.mark.parametrize(
    ("limit", "body", "error", "reason"),
    [
        (limits(max_prompt_tokens=2), chat(), BadRequestError, "max_prompt_tokens"),
        (limits(max_output_tokens=5), chat(max_tokens=6), BadRequestError, "max_output_tokens"),
        (limits(tokens_per_minute=10), chat(max_tokens=60), RateLimitError, "tokens_per_minute"),
        (limits(tokens_per_day=10), chat(max_tokens=60), RateLimitError, "tokens_per_day"),
        (limits(tokens_per_month=10), chat(max_tokens=60), RateLimitError, "tokens_per_month"),
    ],
)
async def test_a_refusal_names_its_limit(
    quota: Quota,
    denials: list[tuple[str, str]],
    limit: Limits,
    body: dict[str, object],
    error: type[GatewayError],
    reason: str,
) -> None:
    tenant = make_tenant(limit)
    with pytest.raises(error):
        await quota.admit(POLICY, tenant, None, ROUTE, body, "chat")
    assert denials == [(tenant.tenant_id, reason)]


async def test_rate_and_concurrency_refusals(quota: Quota, denials: list[tuple[str, str]]) -> None:
    by_rate = make_tenant(limits(requests_per_minute=1))
    by_slots = make_tenant(limits(max_concurrent=1))
    for tenant in (by_rate, by_slots):
        await quota.admit(POLICY, tenant, None, ROUTE, chat(max_tokens=1), "chat")
        with pytest.raises(RateLimitError):
            await quota.admit(POLICY, tenant, None, ROUTE, chat(max_tokens=1), "chat")
    assert denials == [
        (by_rate.tenant_id, "requests_per_minute"),
        (by_slots.tenant_id, "max_concurrent"),
    ]


async def test_an_unavailable_store_denies_only_fail_closed_tenants(
    quota: Quota, store: RecordingStore, denials: list[tuple[str, str]]
) -> None:
    store.failing = True
    closed = make_tenant(limits(tokens_per_minute=100))
    opened = make_tenant(limits(tokens_per_minute=100), on_store_failure="fail_open")
    with pytest.raises(ServiceUnavailableError):
        await quota.admit(POLICY, closed, None, ROUTE, chat(max_tokens=1), "chat")
    await quota.admit(POLICY, opened, None, ROUTE, chat(max_tokens=1), "chat")
    assert denials == [(closed.tenant_id, "store_unavailable")]


async def test_an_admitted_request_is_no_denial(
    quota: Quota, denials: list[tuple[str, str]]
) -> None:
    tenant = make_tenant(limits(tokens_per_minute=1000))
    await quota.admit(POLICY, tenant, None, ROUTE, chat(max_tokens=5), "chat")
    assert denials == []
