"""The `QuotaStore` contract, run against the memory store and against Redis
(a real redis-server), both on a fake clock."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.policy.compiled import Limits, LimitSet, TenantPolicy
from gateway.quota.limits import scopes_for
from gateway.quota.store import Admission, Lease, QuotaStore
from tests.unit.gateway.quota.conftest import TTL_S, FakeClock, ask, limits, make_tenant


def only(admission: Admission, kind: str) -> list[str]:
    return [f.scope for f in admission.refusals if f.kind == kind]


def granted(admission: Admission) -> Lease:
    assert admission.lease is not None, admission.refusals
    return admission.lease


async def spend(store: QuotaStore, tenant: TenantPolicy, tokens: int) -> Admission:
    """Admit and settle at once, using every reserved token (a finished request:
    its lease no longer expires, its tokens stay in the window)."""
    admission = await store.admit(ask(tenant, tokens))
    if admission.lease is not None:
        assert await store.settle(admission.lease, tokens)
    return admission


async def test_tokens_per_minute_admits_what_fits_and_refuses_the_rest(
    store: QuotaStore, clock: FakeClock
) -> None:
    tenant = make_tenant(limits(tokens_per_minute=100))
    first = await spend(store, tenant, 60)
    assert first.allowed
    (figure,) = first.figures
    assert (figure.kind, figure.limit, figure.used, figure.remaining, figure.reset_s) == (
        "tokens_per_minute",
        100,
        60,
        40,
        60.0,
    )
    clock.advance(5)
    refused = await store.admit(ask(tenant, 41))
    assert not refused.allowed
    assert refused.decisive is not None
    assert refused.decisive.code == "rate_limit_exceeded"
    assert refused.retry_after_s == pytest.approx(55, abs=0.01)
    (figure,) = refused.figures
    assert (figure.used, figure.reset_s) == (60, pytest.approx(55, abs=0.01))
    assert (await spend(store, tenant, 40)).allowed
    usage = await store.peek(scopes_for(tenant, None, "m")[0])
    assert (usage.requests, usage.tokens) == (2, 100)


async def test_the_window_slides(store: QuotaStore, clock: FakeClock) -> None:
    tenant = make_tenant(limits(tokens_per_minute=100))
    granted(await spend(store, tenant, 50))
    clock.advance(30)
    granted(await spend(store, tenant, 50))
    clock.advance(29)
    refused = await store.admit(ask(tenant, 10))
    assert refused.retry_after_s == pytest.approx(1, abs=0.01)
    clock.advance(1.001)  # the first 50 leave the window
    assert (await spend(store, tenant, 50)).allowed
    assert not (await store.admit(ask(tenant, 1))).allowed


async def test_a_refusal_after_the_window_moved_keeps_its_count_exact(
    store: QuotaStore, clock: FakeClock
) -> None:
    # The refused admit is the one that drops the old entry from the window:
    # what it drops must leave the window's token count too.
    tenant = make_tenant(limits(tokens_per_minute=100, max_concurrent=1))
    granted(await spend(store, tenant, 30))
    clock.advance(10)
    held = granted(await store.admit(ask(tenant, 20)))
    for _ in range(6):  # 51 s: the 30 leave the window, the 20 stay
        clock.advance(8.5)
        assert await store.renew([held]) == 1
    refused = await store.admit(ask(tenant, 10))
    assert only(refused, "max_concurrent") and not only(refused, "tokens_per_minute")
    (tpm,) = [f for f in refused.figures if f.kind == "tokens_per_minute"]
    assert tpm.used == 20
    usage = await store.peek(scopes_for(tenant, None, "m")[0])
    assert (usage.requests, usage.tokens, usage.concurrent) == (1, 20, 1)
    assert await store.settle(held, 20)
    granted(await spend(store, tenant, 80))
    assert only(await store.admit(ask(tenant, 1)), "tokens_per_minute")


async def test_requests_per_minute(store: QuotaStore, clock: FakeClock) -> None:
    tenant = make_tenant(limits(requests_per_minute=3))
    for _ in range(3):
        granted(await spend(store, tenant, 1000))
        clock.advance(1)
    refused = await store.admit(ask(tenant, 1))
    assert only(refused, "requests_per_minute") == [f"tenant '{tenant.tenant_id}'"]
    assert refused.retry_after_s == pytest.approx(57, abs=0.01)
    clock.advance(57.001)
    assert (await store.admit(ask(tenant, 1))).allowed


async def test_concurrency_slots_free_on_settle_and_release(
    store: QuotaStore, clock: FakeClock
) -> None:
    tenant = make_tenant(limits(max_concurrent=2))
    a = granted(await store.admit(ask(tenant, 10)))
    b = granted(await store.admit(ask(tenant, 10)))
    refused = await store.admit(ask(tenant, 10))
    assert only(refused, "max_concurrent") and refused.retry_after_s > 0
    assert await store.settle(a, 5)
    c = granted(await store.admit(ask(tenant, 10)))
    assert await store.release(b)
    assert await store.release(c)
    usage = await store.peek(scopes_for(tenant, None, "m")[0])
    assert usage.concurrent == 0


async def test_a_refusal_charges_nothing_anywhere(store: QuotaStore, clock: FakeClock) -> None:
    app_limits = LimitSet(Limits(tokens_per_minute=50, max_concurrent=5))
    tenant = make_tenant(
        limits(tokens_per_minute=100, requests_per_minute=10, tokens_per_day=1000),
        apps={"bot": app_limits},
    )
    tenant_scope, app_scope = scopes_for(tenant, "bot", "m")
    granted(await store.admit(ask(tenant, 40, app="bot")))
    # The app has no room; the tenant does: nothing may be charged to the tenant.
    refused = await store.admit(ask(tenant, 20, app="bot"))
    assert [f.scope for f in refused.refusals] == [app_scope.label]
    tenant_usage = await store.peek(tenant_scope)
    assert (tenant_usage.requests, tenant_usage.tokens, tenant_usage.day_tokens) == (1, 40, 40)
    assert (await store.peek(app_scope)).concurrent == 1
    # Another app is only bound by the tenant.
    granted(await store.admit(ask(tenant, 60, app="other")))
    # Now the tenant is full and the app has room: nothing may be charged to the app.
    refused = await store.admit(ask(tenant, 5, app="bot"))
    assert [f.scope for f in refused.refusals] == [tenant_scope.label]
    app_usage = await store.peek(app_scope)
    assert (app_usage.requests, app_usage.tokens, app_usage.concurrent) == (1, 40, 1)


async def test_model_overrides_add_a_budget_inside_the_tenants(
    store: QuotaStore, clock: FakeClock
) -> None:
    tenant = make_tenant(
        limits(tokens_per_minute=100), overrides={"big": limits(tokens_per_minute=30)}
    )
    granted(await store.admit(ask(tenant, 25, model="big")))
    refused = await store.admit(ask(tenant, 10, model="big"))
    assert [f.scope for f in refused.refusals] == [f"tenant '{tenant.tenant_id}' for model 'big'"]
    granted(await store.admit(ask(tenant, 75, model="small")))
    refused = await store.admit(ask(tenant, 1, model="small"))
    assert [f.scope for f in refused.refusals] == [f"tenant '{tenant.tenant_id}'"]


async def test_app_model_override(store: QuotaStore, clock: FakeClock) -> None:
    app = LimitSet(
        Limits(requests_per_minute=10),
        {"big": Limits(requests_per_minute=1)},  # type: ignore[arg-type]
    )
    tenant = make_tenant(apps={"bot": app})
    granted(await store.admit(ask(tenant, 5, app="bot", model="big")))
    assert not (await store.admit(ask(tenant, 5, app="bot", model="big"))).allowed
    assert (await store.admit(ask(tenant, 5, app="bot", model="small"))).allowed


async def test_settle_refunds_the_unused_reservation(store: QuotaStore, clock: FakeClock) -> None:
    tenant = make_tenant(limits(tokens_per_minute=100, tokens_per_day=1000))
    (scope,) = scopes_for(tenant, None, "m")
    lease = granted(await store.admit(ask(tenant, 80)))
    assert await store.settle(lease, 30)
    usage = await store.peek(scope)
    assert (usage.tokens, usage.day_tokens, usage.requests) == (30, 30, 1)
    assert (await store.admit(ask(tenant, 70))).allowed
    assert not (await store.admit(ask(tenant, 1))).allowed


async def test_settle_charges_usage_above_the_reservation(
    store: QuotaStore, clock: FakeClock
) -> None:
    tenant = make_tenant(limits(tokens_per_minute=100, tokens_per_month=1000))
    (scope,) = scopes_for(tenant, None, "m")
    lease = granted(await store.admit(ask(tenant, 20)))
    assert await store.settle(lease, 120)
    usage = await store.peek(scope)
    assert (usage.tokens, usage.month_tokens) == (120, 120)
    assert not (await store.admit(ask(tenant, 1))).allowed


async def test_settle_and_release_are_idempotent(store: QuotaStore, clock: FakeClock) -> None:
    tenant = make_tenant(limits(tokens_per_minute=100, max_concurrent=3, tokens_per_day=500))
    (scope,) = scopes_for(tenant, None, "m")
    lease = granted(await store.admit(ask(tenant, 50)))
    other = granted(await store.admit(ask(tenant, 10)))
    assert await store.settle(lease, 20)
    assert not await store.settle(lease, 20)
    assert not await store.settle(lease, 0)
    assert not await store.release(lease)
    usage = await store.peek(scope)
    assert (usage.tokens, usage.concurrent, usage.day_tokens) == (30, 1, 30)
    assert await store.release(other)
    assert not await store.release(other)
    usage = await store.peek(scope)
    assert (usage.requests, usage.tokens, usage.concurrent, usage.day_tokens) == (1, 20, 0, 20)


async def test_release_refunds_everything(store: QuotaStore, clock: FakeClock) -> None:
    tenant = make_tenant(
        limits(requests_per_minute=1, tokens_per_minute=10, max_concurrent=1, tokens_per_day=10)
    )
    lease = granted(await store.admit(ask(tenant, 10)))
    assert await store.release(lease)
    assert (await store.admit(ask(tenant, 10))).allowed


async def test_an_expired_lease_is_reclaimed(store: QuotaStore, clock: FakeClock) -> None:
    tenant = make_tenant(limits(max_concurrent=1, tokens_per_day=100))
    (scope,) = scopes_for(tenant, None, "m")
    lost = granted(await store.admit(ask(tenant, 60)))
    clock.advance(TTL_S - 0.5)
    assert not (await store.admit(ask(tenant, 10))).allowed
    clock.advance(1)
    fresh = granted(await store.admit(ask(tenant, 90)))
    usage = await store.peek(scope)
    assert (usage.concurrent, usage.day_tokens) == (1, 90)
    # The dead gateway's late settle must not count anything twice.
    assert not await store.settle(lost, 60)
    assert await store.settle(fresh, 90)
    usage = await store.peek(scope)
    assert (usage.concurrent, usage.day_tokens) == (0, 90)


async def test_renewal_keeps_a_lease(store: QuotaStore, clock: FakeClock) -> None:
    tenant = make_tenant(limits(max_concurrent=1))
    lease = granted(await store.admit(ask(tenant, 1)))
    for _ in range(3):
        clock.advance(TTL_S * 0.8)
        assert await store.renew([lease]) == 1
    assert not (await store.admit(ask(tenant, 1))).allowed
    assert await store.settle(lease, 1)
    assert await store.renew([lease]) == 0


async def test_admitting_the_same_lease_twice_charges_once(
    store: QuotaStore, clock: FakeClock
) -> None:
    tenant = make_tenant(limits(tokens_per_minute=100))
    reservation = ask(tenant, 60)
    assert (await store.admit(reservation)).allowed
    assert (await store.admit(reservation)).allowed
    assert (await store.peek(scopes_for(tenant, None, "m")[0])).tokens == 60


async def test_a_request_larger_than_the_limit_never_fits(
    store: QuotaStore, clock: FakeClock
) -> None:
    tenant = make_tenant(limits(tokens_per_minute=100, tokens_per_day=50))
    refused = await store.admit(ask(tenant, 101))
    assert {f.kind for f in refused.refusals if f.never_fits} == {
        "tokens_per_minute",
        "tokens_per_day",
    }
    assert refused.decisive is not None and refused.decisive.code == "insufficient_quota"


async def test_day_budget_follows_the_tenants_time_zone(
    store: QuotaStore, clock: FakeClock
) -> None:
    zone = "America/New_York"
    tenant = make_tenant(limits(tokens_per_day=100, time_zone=zone))
    (scope,) = scopes_for(tenant, None, "m")
    # 04:59:55 UTC on the 9th: still the 8th in New York.
    clock.set_local(zone, 2025, 3, 8, 23, 59, 55)
    lease = granted(await store.admit(ask(tenant, 100)))
    refused = await store.admit(ask(tenant, 1))
    assert refused.decisive is not None
    assert (refused.decisive.kind, refused.decisive.code) == (
        "tokens_per_day",
        "insufficient_quota",
    )
    assert refused.retry_after_s == pytest.approx(5, abs=0.01)
    clock.set_local(zone, 2025, 3, 9, 0, 0, 1)
    allowed = await store.admit(ask(tenant, 100))
    assert allowed.allowed
    (figure,) = allowed.figures
    # 9 March 2025 is the day clocks spring forward: 23 hours long.
    assert figure.reset_s == pytest.approx(23 * 3600 - 1, abs=0.01)
    # A settle after midnight corrects the day it was admitted in.
    assert await store.settle(lease, 40)
    assert (await store.peek(scope)).day_tokens == 100
    clock.set_local(zone, 2025, 3, 8, 23, 59, 30)
    assert (await store.peek(scope)).day_tokens == 40


async def test_day_budget_defaults_to_utc(store: QuotaStore, clock: FakeClock) -> None:
    tenant = make_tenant(limits(tokens_per_day=10))
    clock.set_local("UTC", 2025, 6, 1, 23, 59, 59)
    granted(await store.admit(ask(tenant, 10)))
    assert not (await store.admit(ask(tenant, 1))).allowed
    clock.set_local("UTC", 2025, 6, 2, 0, 0, 0)
    assert (await store.admit(ask(tenant, 10))).allowed


async def test_month_budget_in_the_tenants_zone(store: QuotaStore, clock: FakeClock) -> None:
    zone = "Asia/Tokyo"
    tenant = make_tenant(limits(tokens_per_month=100, time_zone=zone))
    clock.set_local(zone, 2025, 1, 31, 23, 59, 30)
    granted(await store.admit(ask(tenant, 100)))
    refused = await store.admit(ask(tenant, 1))
    assert refused.decisive is not None and refused.decisive.kind == "tokens_per_month"
    assert refused.retry_after_s == pytest.approx(30, abs=0.01)
    clock.set_local("UTC", 2025, 1, 31, 15, 0, 0)  # 00:00 on 1 February in Tokyo
    assert (await store.admit(ask(tenant, 100))).allowed


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    steps=st.lists(
        st.tuples(
            st.integers(min_value=1, max_value=60),  # tokens asked
            st.floats(min_value=0, max_value=1),  # fraction actually used
            st.floats(min_value=0, max_value=8),  # seconds until the next step (< TTL)
            st.booleans(),  # finish the request before the next step
        ),
        min_size=1,
        max_size=40,
    )
)
async def test_admits_exactly_what_fits(
    store: QuotaStore, clock: FakeClock, steps: list[tuple[int, float, float, bool]]
) -> None:
    """Against a reference log: never more than the limit in any window, and
    never a refusal of a request that fits."""
    limit = 100
    tenant = make_tenant(limits(tokens_per_minute=limit))
    log: list[tuple[float, int, Lease]] = []  # admitted at, tokens charged now, lease
    open_leases: list[tuple[int, Lease, float]] = []
    for asked, used_fraction, pause, finish_now in steps:
        in_window = sum(tokens for at, tokens, _ in log if at > clock.now - 60)
        admission = await store.admit(ask(tenant, asked))
        assert admission.allowed == (in_window + asked <= limit)
        if admission.lease is not None:
            log.append((clock.now, asked, admission.lease))
            open_leases.append((len(log) - 1, admission.lease, used_fraction))
        if finish_now and open_leases:
            index, lease, fraction = open_leases.pop(0)
            actual = int(log[index][1] * fraction)
            assert await store.settle(lease, actual)
            log[index] = (log[index][0], actual, lease)
        # Requests still running keep their leases alive, as the keeper does.
        await store.renew([lease for _, lease, _ in open_leases])
        clock.advance(pause)


async def test_a_live_store_answers_a_ping(store: QuotaStore) -> None:
    await store.ping()
