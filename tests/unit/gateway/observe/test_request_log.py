"""`RequestLog`: request lines written together, off the requests' path."""

from __future__ import annotations

import asyncio
import io
import json
import sys
import time
from collections.abc import Iterator

import pytest
import structlog

from gateway.logging import configure_logging
from gateway.observe.request_log import MAX_PENDING, RequestLog


class Output(io.BytesIO):
    """stdout's bytes, and how many times they were flushed."""

    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1

    def lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.getvalue().splitlines()]


@pytest.fixture
def output(monkeypatch: pytest.MonkeyPatch) -> Iterator[Output]:
    out = Output()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out, write_through=True))
    configure_logging("info")
    yield out
    structlog.reset_defaults()


async def test_lines_wait_for_the_delay_then_leave_in_one_flush(output: Output) -> None:
    request_log = RequestLog(delay_s=0.05)
    request_log.add({"request_id": "a", "status": 200})
    request_log.add({"request_id": "b", "status": 429})
    assert output.getvalue() == b""  # nothing on the requests' path
    await asyncio.sleep(0.15)
    # The line reads as before batching: its fields, then event, level, timestamp.
    assert list(output.lines()[0])[:2] == ["request_id", "status"]
    assert list(output.lines()[0])[-3:] == ["event", "level", "timestamp"]
    assert [(r["event"], r["request_id"], r["status"]) for r in output.lines()] == [
        ("request", "a", 200),
        ("request", "b", 429),
    ]
    assert output.flushes == 1


async def test_each_line_keeps_the_time_its_request_ended(output: Output) -> None:
    request_log = RequestLog(delay_s=0.3)
    ended = time.time()
    request_log.add({"request_id": "a"})
    await asyncio.sleep(0.45)
    (line,) = output.lines()
    stamped = str(line["timestamp"])
    assert stamped.endswith("Z")
    from datetime import datetime

    seconds = datetime.fromisoformat(stamped.replace("Z", "+00:00")).timestamp()
    assert abs(seconds - ended) < 0.1  # not the flush, 0.3 s later


async def test_a_full_batch_is_written_at_once(output: Output) -> None:
    request_log = RequestLog(delay_s=60)
    for i in range(MAX_PENDING):
        request_log.add({"request_id": str(i)})
    assert len(output.lines()) == MAX_PENDING


async def test_flush_writes_what_waits_and_cancels_the_timer(output: Output) -> None:
    request_log = RequestLog(delay_s=0.05)
    request_log.add({"request_id": "a"})
    request_log.flush()
    assert [r["request_id"] for r in output.lines()] == ["a"]
    await asyncio.sleep(0.1)
    assert len(output.lines()) == 1  # the timer wrote nothing twice


async def test_other_lines_are_flushed_at_once(output: Output) -> None:
    structlog.get_logger("tollgate.test").warning("replica_down", replica="r1")
    assert [r["event"] for r in output.lines()] == ["replica_down"]
    assert output.flushes == 1
