"""The drainer and its sources: records reach the ledger once, a batch is
acknowledged only after its file is durable, a re-read batch is flagged, and
only one drainer is active at a time."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from pathlib import Path

import pytest

from gateway.quota.memory import MemoryQuotaStore
from gateway.quota.redis_store import RedisQuotaStore, connect, usage_stream
from gateway.usage.drainer import Drainer
from gateway.usage.export import parse_query, run_export
from gateway.usage.ledger import Ledger
from gateway.usage.sources import (
    LostLeadershipError,
    MemoryUsageSource,
    RedisUsageSource,
)
from tests.support.processes import RedisServer
from tests.unit.gateway.usage.conftest import PRICING, entry

EVERYTHING = parse_query("2000-01-01", "2100-01-01", group_by="tenant")


def totals(ledger: Ledger) -> tuple[int, int]:
    """(requests, prompt tokens) in the ledger after de-duplication."""
    result = run_export(ledger, PRICING, EVERYTHING)
    return result.totals["requests"], result.totals["prompt_tokens"]


def raw_count(ledger: Ledger) -> int:
    import duckdb

    files = [str(f) for f in ledger.files(dt.date(2000, 1, 1), dt.date(2100, 1, 1))]
    if not files:
        return 0
    ((count,),) = duckdb.sql(f"SELECT count(*) FROM read_parquet({files})").fetchall()
    return int(count)


async def test_every_ledger_call_runs_on_the_drainers_one_writer_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One thread keeps DuckDB's freed buffers in one malloc arena (see the
    # drainer's docstring), and never on the event loop's thread.
    store = MemoryQuotaStore(lease_ttl_s=60)
    ledger = Ledger(tmp_path)
    drainer = Drainer(MemoryUsageSource(store), ledger, interval_s=60, batch_size=2)
    threads: list[str] = []
    for name in ("write", "maintain", "close"):
        real = getattr(ledger, name)

        def traced(*args: object, _real: object = real) -> object:
            threads.append(threading.current_thread().name)
            return _real(*args)  # type: ignore[operator]

        monkeypatch.setattr(ledger, name, traced)
    for round_ in range(3):
        for i in range(3):
            await store.append("acme", entry("acme", prompt=round_ * 3 + i + 1))
        assert await drainer.drain_once() == 3
    assert len(threads) >= 3 * 3  # two writes and a close per round, one maintain
    assert len(set(threads)) == 1
    assert threads[0].startswith("tollgate-ledger")
    assert threads[0] != threading.current_thread().name
    await drainer.stop()
    assert totals(ledger) == (9, sum(range(1, 10)))


async def test_the_memory_buffer_is_drained_and_a_failed_write_is_retried_flagged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = MemoryQuotaStore(lease_ttl_s=60)
    for i in range(5):
        await store.append("acme", entry("acme", prompt=i + 1))
    ledger = Ledger(tmp_path)
    drainer = Drainer(MemoryUsageSource(store), ledger, interval_s=60, batch_size=3)
    real_write = ledger.write
    calls = {"n": 0}

    def write_then_fail(lines):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        real_write(lines)  # durable, but the process "fails" before the ack
        if calls["n"] == 1:
            raise OSError("disk hiccup after the rename")
        return []

    monkeypatch.setattr(ledger, "write", write_then_fail)
    with pytest.raises(OSError):
        await drainer.drain_once()
    assert len(store.usage_buffer) == 5  # nothing acknowledged
    assert await drainer.drain_once() == 5
    assert not store.usage_buffer
    # Three records are on disk twice; the second copies are flagged.
    assert raw_count(ledger) == 8
    assert totals(ledger) == (5, 15)


async def test_stop_flushes_the_memory_buffer(tmp_path: Path) -> None:
    store = MemoryQuotaStore(lease_ttl_s=60)
    await store.append("acme", entry("acme", prompt=4))
    ledger = Ledger(tmp_path)
    drainer = Drainer(MemoryUsageSource(store), ledger, interval_s=3600)
    drainer.start()
    await drainer.stop()
    assert totals(Ledger(tmp_path)) == (1, 4)


async def _redis_source(server: RedisServer) -> tuple[RedisQuotaStore, RedisUsageSource]:
    client = connect(server.url, timeout_s=5)
    store = RedisQuotaStore(client, lease_ttl_s=60)
    return store, RedisUsageSource(client, store, lock_ttl_s=30)


async def test_redis_streams_are_drained_once_by_one_drainer(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    store, first = await _redis_source(redis_server)
    _, second = await _redis_source(redis_server)
    tenants = [f"t{uuid.uuid4().hex[:6]}" for _ in range(3)]
    for n, tenant in enumerate(tenants):
        for _ in range(n + 1):
            await store.append(tenant, entry(tenant, prompt=10))
    assert await first.acquire() and not await second.acquire()
    ledger = Ledger(tmp_path)
    drainer = Drainer(first, ledger, interval_s=60, batch_size=4)
    assert await drainer.drain_once() == 6
    assert await Drainer(second, ledger, interval_s=60).drain_once() == 0  # not the leader
    client = store._client
    assert [await client.xlen(usage_stream(t)) for t in tenants] == [0, 0, 0]
    assert totals(ledger) == (6, 60) and raw_count(ledger) == 6
    await first.release()
    assert await second.acquire()
    await first.close()
    await second.close()


async def test_a_drainer_that_lost_the_lock_cannot_write_and_its_batch_comes_back_flagged(
    redis_server: RedisServer,
) -> None:
    store, first = await _redis_source(redis_server)
    _, second = await _redis_source(redis_server)
    tenant = f"t{uuid.uuid4().hex[:6]}"
    for _ in range(3):
        await store.append(tenant, entry(tenant, prompt=1))
    assert await first.acquire()
    batch = await first.read(10)
    await first.mark(batch)  # about to write ... and then it dies (no ack)
    assert not any(line.check for line in batch.lines)
    await store._client.delete("tollgate:u:{drainer}:lock")  # its lock expires
    assert await second.acquire()
    again = await second.read(10)
    assert len(again.lines) == 3 and all(line.check for line in again.lines)
    with pytest.raises(LostLeadershipError):
        await first.mark(batch)
    await first.close()
    await second.close()
