"""Admission with the usage ledger on: every admitted request holds a lease
and carries its record, which finishing the grant hands to the store."""

from __future__ import annotations

import msgspec
import pytest

from gateway.errors import ServiceUnavailableError, UpstreamTimeoutError
from gateway.quota.admission import REQUEST_ID_HEADER, Quota
from gateway.usage.record import RecordDraft, UsageRecord
from tests.unit.gateway.quota.conftest import FakeClock, limits, make_tenant
from tests.unit.gateway.quota.test_admission import POLICY, PROMPT, ROUTE, RecordingStore, chat

decode = msgspec.json.Decoder(UsageRecord).decode


def ledger_quota(store: RecordingStore) -> Quota:
    return Quota(store, lease_ttl_s=30, ledger=True)


def buffered(store: RecordingStore) -> list[tuple[UsageRecord, bool]]:
    return [(decode(e.data), e.check) for e in store.usage_buffer]


async def test_a_tenant_without_limits_gets_a_lease_for_its_record(clock: FakeClock) -> None:
    store = RecordingStore(clock)
    quota = ledger_quota(store)
    draft = RecordDraft("ignored", "auto", "m", app="bot", user="u1", priority="standard")
    grant = await quota.admit(
        POLICY, make_tenant(), "bot", ROUTE, chat(max_tokens=10), "chat", draft
    )
    assert grant.lease is not None and grant.record is draft
    assert grant.headers == {REQUEST_ID_HEADER: grant.lease.lease_id}
    assert draft.request_id == grant.lease.lease_id
    assert (draft.prompt_estimate, draft.reserved_tokens) == (PROMPT, PROMPT + 10)
    grant.record.replica = "http://r1"
    await grant.settle(PROMPT + 4)
    await quota.keeper.stop()
    ((record, flagged),) = buffered(store)
    assert (record.request_id, record.status, record.replica, flagged) == (
        grant.lease.lease_id,
        "ok",
        "http://r1",
        False,
    )
    assert (record.prompt_tokens, record.completion_tokens) == (PROMPT, 4)


async def test_an_error_after_sending_records_the_reservation(clock: FakeClock) -> None:
    store = RecordingStore(clock)
    quota = ledger_quota(store)
    tenant = make_tenant(limits(tokens_per_minute=1000))
    grant = await quota.admit(POLICY, tenant, None, ROUTE, chat(max_tokens=10), "chat")
    grant.sent = True
    grant.finish_after_error(UpstreamTimeoutError("slow"))
    await quota.keeper.stop()
    ((record, _),) = buffered(store)
    assert (record.status, record.http_status, record.error_code) == (
        "error",
        504,
        "upstream_timeout",
    )
    assert (record.prompt_tokens, record.completion_tokens, record.usage_reported) == (
        PROMPT,
        10,
        False,
    )


async def test_fail_open_requests_are_still_recorded_flagged(clock: FakeClock) -> None:
    store = RecordingStore(clock)
    quota = ledger_quota(store)
    store.failing = True
    tenant = make_tenant(limits(tokens_per_minute=100), on_store_failure="fail_open")
    grant = await quota.admit(POLICY, tenant, None, ROUTE, chat(max_tokens=1), "chat")
    assert grant.lease is None and REQUEST_ID_HEADER in grant.headers
    await grant.settle(PROMPT + 1)  # the store is down: kept for retry
    assert store.usage_buffer == type(store.usage_buffer)()
    store.failing = False
    await quota.keeper.tick()
    await quota.keeper.stop()
    ((record, flagged),) = buffered(store)
    assert (record.status, flagged) == ("ok", True)


async def test_fail_closed_records_nothing_for_a_refused_request(clock: FakeClock) -> None:
    store = RecordingStore(clock)
    quota = ledger_quota(store)
    store.failing = True
    tenant = make_tenant(limits(tokens_per_minute=100))
    with pytest.raises(ServiceUnavailableError):
        await quota.admit(POLICY, tenant, None, ROUTE, chat(max_tokens=1), "chat")
    store.failing = False
    await quota.keeper.tick()  # the cleanup release: its lease never existed
    await quota.keeper.stop()
    assert buffered(store) == []
