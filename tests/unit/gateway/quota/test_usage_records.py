"""Usage records in the quota store contract (memory and Redis): appended in
the step that settles or releases a lease, and `interrupted` when a lease
expires, by the next admit or by a sweep."""

from __future__ import annotations

import msgspec

from gateway.quota.limits import reservation_for
from gateway.quota.memory import MemoryQuotaStore
from gateway.quota.redis_store import RedisQuotaStore, usage_stream
from gateway.quota.store import Lease, QuotaStore
from gateway.usage.record import UsageRecord
from tests.unit.gateway.quota.conftest import TTL_S, FakeClock, limits, make_tenant
from tests.unit.gateway.usage.conftest import draft, entry

decode = msgspec.json.Decoder(UsageRecord).decode


async def records(store: QuotaStore, tenant_id: str) -> list[tuple[UsageRecord, bool]]:
    """(record, flagged) in the order the store appended them."""
    found: list[tuple[UsageRecord, bool]] = []
    if isinstance(store, MemoryQuotaStore):
        for e in store.usage_buffer:
            record = decode(e.data)
            if record.tenant == tenant_id:
                found.append((record, e.check))
        return found
    assert isinstance(store, RedisQuotaStore)
    for _, fields in await store._client.xrange(usage_stream(tenant_id)):
        found.append((decode(fields[b"r"]), fields.get(b"c") == b"1"))
    return found


async def admitted(store: QuotaStore, tenant_id: str, **limit_values: int) -> Lease:
    tenant = make_tenant(limits(**limit_values), tenant_id=tenant_id)
    d = draft(tenant_id, reserved=100, prompt_estimate=10)
    reservation = reservation_for(
        tenant, None, "m", 100, lease_id=d.request_id, usage=d.open_entry("reserved")
    )
    admission = await store.admit(reservation)
    assert admission.lease is not None
    return admission.lease


def _id(tag: str) -> str:
    import uuid

    return f"{tag}{uuid.uuid4().hex[:10]}"


async def test_settle_and_release_append_the_record_in_the_same_step(store: QuotaStore) -> None:
    tenant_id = _id("rec")
    lease = await admitted(store, tenant_id, tokens_per_minute=1000)
    assert await records(store, tenant_id) == []  # the open record stays with the lease
    done = entry(tenant_id, prompt=7, completion=3, request_id=lease.lease_id)
    assert await store.settle(lease, 10, done)
    other = await admitted(store, tenant_id, tokens_per_minute=1000)
    refused = entry(tenant_id, status="error", request_id=other.lease_id)
    assert await store.release(other, refused)
    got = await records(store, tenant_id)
    assert [(r.request_id, r.status, flagged) for r, flagged in got] == [
        (lease.lease_id, "ok", False),
        (other.lease_id, "error", False),
    ]
    assert (got[0][0].prompt_tokens, got[0][0].completion_tokens) == (7, 3)


async def test_a_record_for_an_unknown_lease_is_kept_but_flagged(store: QuotaStore) -> None:
    tenant_id = _id("late")
    lease = await admitted(store, tenant_id, max_concurrent=5)
    first = entry(tenant_id, prompt=1, request_id=lease.lease_id)
    assert await store.settle(lease, 1, first)
    # A repeated settlement (its first reply was lost): counted once, but
    # the record may now exist twice, so the copy is flagged.
    assert not await store.settle(lease, 1, first)
    # A cleanup that only applies while the lease exists leaves nothing.
    ghost = Lease(tenant_id, "never-admitted", 10)
    void = draft(tenant_id).final_entry("reserved", reached_backend=False, only_if_known=True)
    assert not await store.release(ghost, void)
    got = await records(store, tenant_id)
    assert [flagged for _, flagged in got] == [False, True]
    assert {r.request_id for r, _ in got} == {lease.lease_id}


async def test_an_expired_lease_becomes_an_interrupted_record(
    store: QuotaStore, clock: FakeClock
) -> None:
    tenant_id = _id("dead")
    lease = await admitted(store, tenant_id, max_concurrent=1)
    clock.advance(TTL_S + 1)
    # The next admit for the tenant reclaims it (and is admitted itself).
    await admitted(store, tenant_id, max_concurrent=1)
    got = await records(store, tenant_id)
    assert len(got) == 1
    record, flagged = got[0]
    assert (record.request_id, record.status, flagged) == (lease.lease_id, "interrupted", True)
    # Charged the reservation by default: prompt estimate + max_tokens.
    assert (record.prompt_tokens, record.completion_tokens) == (10, 90)
    assert record.ended_ms is not None and record.latency_ms is not None
    # A late settlement still writes its record (flagged: it supersedes the
    # interrupted one in exports), but counts nothing.
    assert not await store.settle(lease, 5, entry(tenant_id, prompt=5, request_id=lease.lease_id))
    assert [r.status for r, _ in await records(store, tenant_id)] == ["interrupted", "ok"]


async def test_a_sweep_records_interruptions_of_a_tenant_that_sent_nothing_more(
    store: QuotaStore, clock: FakeClock
) -> None:
    tenant_id = _id("quiet")
    # No counted limit at all: the lease exists for the ledger alone.
    lease = await admitted(store, tenant_id)
    assert await store.sweep() == 0
    clock.advance(TTL_S + 1)
    assert await store.sweep() >= 1
    got = await records(store, tenant_id)
    assert [(r.request_id, r.status) for r, _ in got] == [(lease.lease_id, "interrupted")]
    assert not await store.settle(lease, 1)  # already reclaimed


async def test_append_without_a_lease(store: QuotaStore) -> None:
    tenant_id = _id("open")
    await store.append(tenant_id, entry(tenant_id, prompt=3, check=True))
    got = await records(store, tenant_id)
    assert [(r.prompt_tokens, flagged) for r, flagged in got] == [(3, True)]
