"""The usage record: what a draft becomes on each way a request can end."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from gateway.errors import ClientClosedRequestError, UpstreamTimeoutError
from gateway.usage.record import UsageRecord, close_open_record, unknown_tokens
from tests.unit.gateway.usage.conftest import Usage, at_ms, draft

decode = msgspec.json.Decoder(UsageRecord).decode


def test_a_finished_request_records_the_reported_usage() -> None:
    d = draft(started_ms=at_ms(2025, 3, 1, 12), app="bot")
    d.client_request_id = "client-1"
    d.replica = "http://r1"
    d.first_token()
    d.observe(Usage(12, 34, 5))
    entry = d.final_entry("reserved", reached_backend=True)
    record = decode(entry.data)
    assert entry.day == "2025-03-01" and not entry.check
    assert (record.prompt_tokens, record.completion_tokens, record.cached_tokens) == (12, 34, 5)
    assert (record.status, record.http_status, record.usage_reported) == ("ok", 200, True)
    assert (record.request_id, record.client_request_id) == (d.request_id, "client-1")
    assert (record.app, record.user, record.replica) == ("bot", "sub-1", "http://r1")
    assert record.ttft_ms is not None and record.latency_ms is not None
    assert record.ended_ms is not None and record.ended_ms >= record.started_ms
    # Never any text: only the declared fields exist.
    assert set(msgspec.json.decode(entry.data)) <= set(UsageRecord.__struct_fields__)


@pytest.mark.parametrize(
    ("charge", "expected"), [("reserved", (10, 90)), ("prompt", (10, 0)), ("none", (0, 0))]
)
def test_unknown_usage_is_charged_by_policy(charge: str, expected: tuple[int, int]) -> None:
    assert unknown_tokens(charge, 10, 100) == expected  # type: ignore[arg-type]
    d = draft(reserved=100, prompt_estimate=10)
    d.stream_ended("cancelled")
    record = decode(d.final_entry(charge, reached_backend=True).data)  # type: ignore[arg-type]
    assert (record.prompt_tokens, record.completion_tokens) == expected
    assert (record.status, record.http_status, record.usage_reported) == ("cancelled", 200, False)


def test_a_request_that_never_reached_a_backend_records_no_tokens() -> None:
    d = draft()
    d.failed(ClientClosedRequestError("left while queued"))
    record = decode(d.final_entry("reserved", reached_backend=False).data)
    assert (record.status, record.http_status, record.error_code) == (
        "cancelled",
        499,
        "client_closed_request",
    )
    assert (record.prompt_tokens, record.completion_tokens) == (0, 0)


def test_errors_and_cancellation_map_to_statuses() -> None:
    timeout = draft()
    timeout.failed(UpstreamTimeoutError("slow"))
    assert (timeout.status, timeout.http_status, timeout.error_code) == (
        "error",
        504,
        "upstream_timeout",
    )
    cancelled = draft()
    cancelled.failed(asyncio.CancelledError())
    assert cancelled.status == "cancelled"
    broken = draft()
    broken.stream_ended("upstream_error")
    assert (broken.status, broken.error_code, broken.http_status) == (
        "error",
        "upstream_error",
        200,
    )


def test_the_open_record_is_closed_by_appending_its_end() -> None:
    d = draft(started_ms=at_ms(2025, 3, 1), reserved=100, prompt_estimate=10)
    open_entry = d.open_entry("reserved")
    assert open_entry.check  # an interrupted record may meet a late settlement
    closed = decode(
        close_open_record(open_entry.data, open_entry.started_ms + 61_000, d.started_ms)
    )
    assert (closed.status, closed.prompt_tokens, closed.completion_tokens) == (
        "interrupted",
        10,
        90,
    )
    assert (closed.ended_ms, closed.latency_ms) == (d.started_ms + 61_000, 61_000)
