"""The usage ledger: drainer throughput and the grouped export of 10 million records.

    python bench/ledger.py                          # full run, writes docs/benchmarks.md
    python bench/ledger.py --drain-records 20000 --export-records 500000 --no-write

Drain: records waiting in Redis (a private redis-server; per-tenant streams,
entries exactly as the store's scripts append them) are moved into Parquet by
the drainer (`gateway.usage.drainer`): read, mark, write durably (fsynced
file, rename, fsynced folder), acknowledge. Figure: records per second, end
to end, one drainer. Also the write path alone (the memory store's buffer).

Export: a synthetic ledger of day-partitioned Parquet files (one compacted
file per day; 0.1% of records flagged for de-duplication, half of them with
a second copy on disk) is exported grouped by tenant and day, de-duplicated
and priced (`gateway.usage.export.run_export`), as `tollgate usage export`
runs it. Figure: seconds, median of three runs (DuckDB on every core).
Targets: at least 20,000 records/s drained; the 10-million-record
export in under 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import duckdb
from common import (  # type: ignore[import-not-found]
    machine_line,
    markdown_table,
    write_section,
)

from gateway.policy.loader import load_policy
from gateway.quota.memory import MemoryQuotaStore
from gateway.quota.redis_store import TENANTS_KEY, RedisQuotaStore, connect, usage_stream
from gateway.usage.drainer import Drainer
from gateway.usage.export import ExportQuery, run_export
from gateway.usage.ledger import Ledger
from gateway.usage.record import RecordDraft, UsageEntry
from gateway.usage.sources import MemoryUsageSource, RedisUsageSource
from tests.support.processes import REPO, RedisServer

DRAIN_TARGET = 20_000.0
EXPORT_TARGET_S = 5.0


def _entries(count: int, tenants: int) -> list[tuple[str, str, bytes]]:
    """(tenant, day, record JSON) as the gateway would append them."""
    out = []
    start = time.time_ns() // 1_000_000
    for i in range(count):
        tenant = f"tenant{i % tenants}"
        draft = RecordDraft(tenant, "smollm2", "smollm2", streamed=i % 2 == 0, app=f"app{i % 5}")
        draft.started_ms = start + i
        draft.request_id = uuid.uuid4().hex
        draft.client_request_id = f"client-{i}"
        draft.user, draft.priority, draft.route = f"user{i % 50}", "standard", "explicit"
        draft.replica, draft.model_version = "http://10.0.0.1:8081", "default"
        draft.prompt_estimate, draft.reserved_tokens = 100 + i % 400, 612
        draft.reported = (100 + i % 400, i % 200, i % 30)
        entry = draft.final_entry("reserved", reached_backend=True)
        out.append((tenant, entry.day, entry.data))
    return out


async def _drain_redis(count: int, tenants: int, root: Path) -> tuple[float, int]:
    server = RedisServer()
    server.start()
    try:
        client = connect(server.url, timeout_s=30)
        entries = _entries(count, tenants)
        async with client.pipeline(transaction=False) as pipe:
            for n, (tenant, day, data) in enumerate(entries, 1):
                pipe.xadd(usage_stream(tenant), {"d": day, "r": data})
                if n % 5000 == 0:
                    await pipe.execute()
            pipe.sadd(TENANTS_KEY, *{t for t, _, _ in entries})
            await pipe.execute()
        store = RedisQuotaStore(client, lease_ttl_s=60)
        source = RedisUsageSource(client, store, lock_ttl_s=60)
        drainer = Drainer(source, Ledger(root), interval_s=60)
        began = time.perf_counter()
        drained = await drainer.drain_once()
        elapsed = time.perf_counter() - began
        await drainer.stop()
        return elapsed, drained
    finally:
        server.stop()


async def _drain_memory(count: int, tenants: int, root: Path) -> tuple[float, int]:
    store = MemoryQuotaStore(lease_ttl_s=60)
    for _, day, data in _entries(count, tenants):
        store.usage_buffer.append(UsageEntry(day, data))
    drainer = Drainer(MemoryUsageSource(store), Ledger(root), interval_s=60)
    began = time.perf_counter()
    drained = await drainer.drain_once()
    elapsed = time.perf_counter() - began
    await drainer.stop()
    return elapsed, drained


def _synthetic_ledger(root: Path, records: int, days: int, tenants: int) -> dt.date:
    """One file per day with the ledger's schema; returns the first day."""
    first = dt.date(2025, 1, 1)
    per_day = records // days
    con = duckdb.connect()
    for d in range(days):
        day = first + dt.timedelta(days=d)
        folder = root / f"day={day.isoformat()}"
        folder.mkdir(parents=True)
        base = round(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp() * 1000)
        rows = f"""
            SELECT i, md5('{day}-' || i)::UUID AS request_id, 'client-' || i AS client_request_id,
                epoch_ms({base} + i % 86400000) AS started_at,
                epoch_ms({base} + i % 86400000 + 800) AS ended_at,
                'tenant' || (i % {tenants}) AS tenant, 'app' || (i % 7) AS app,
                'user' || (i % 1000) AS "user", 'auto' AS model_requested,
                CASE WHEN i % 3 = 0 THEN 'smollm2-small' ELSE 'smollm2' END AS model,
                'default' AS model_version, 'smollm2' AS upstream_model,
                'http://10.0.0.' || (i % 4) || ':8081' AS replica, 'auto; tier=large' AS route,
                'standard' AS priority, i % 2 = 0 AS streamed,
                CASE WHEN i % 5000 = 7 THEN 'interrupted' ELSE 'ok' END AS status,
                200 AS http_status, NULL::VARCHAR AS error_code,
                (100 + i % 500)::BIGINT AS prompt_tokens, (i % 300)::BIGINT AS completion_tokens,
                (i % 40)::BIGINT AS cached_tokens, 612::BIGINT AS reserved_tokens,
                true AS usage_reported, 35.5 AS ttft_ms, 800.0 AS latency_ms,
                i % 1000 = 7 AS dedup_check
            FROM range({per_day}) t(i)
        """
        whole, copies = folder / "compact-bench.parquet", folder / "part-bench.parquet"
        con.execute(
            f"COPY (SELECT * EXCLUDE (i) FROM ({rows})) TO '{whole}' "
            "(FORMAT parquet, COMPRESSION zstd)"
        )
        # Half of the flagged records have a second copy on disk (a crashed drain).
        con.execute(
            f"COPY (SELECT * EXCLUDE (i) FROM ({rows}) WHERE i % 2000 = 7) TO '{copies}' "
            "(FORMAT parquet)"
        )
    con.close()
    return first


def main() -> None:
    """Run both measurements; print and (unless --no-write) record them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drain-records", type=int, default=200_000)
    parser.add_argument("--export-records", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args()
    pricing = load_policy(REPO / "tenants", REPO / "policies").pricing
    machine = machine_line()
    with tempfile.TemporaryDirectory(prefix="tollgate-bench-ledger-") as tmp:
        root = Path(tmp)
        redis_s, redis_n = asyncio.run(_drain_redis(args.drain_records, 50, root / "redis"))
        memory_s, memory_n = asyncio.run(_drain_memory(args.drain_records, 50, root / "memory"))
        print(f"drain redis: {redis_n} records in {redis_s:.2f} s")
        print(f"drain memory: {memory_n} records in {memory_s:.2f} s")
        first = _synthetic_ledger(root / "export", args.export_records, args.days, args.tenants)
        query = ExportQuery(
            first, first + dt.timedelta(days=args.days - 1), group_by=("tenant", "day")
        )
        ledger = Ledger(root / "export")
        timings, result = [], None
        for _ in range(3):
            began = time.perf_counter()
            result = run_export(ledger, pricing, query)
            timings.append(time.perf_counter() - began)
            print(f"export: {time.perf_counter() - began:.2f} s")
        assert result is not None
        export_s = statistics.median(timings)
    rows = [
        [
            "drain, Redis streams -> Parquet (read, write, fsync, ack)",
            redis_n,
            redis_s,
            redis_n / redis_s,
            f">= {DRAIN_TARGET:,.0f}/s",
        ],
        [
            "drain, memory buffer -> Parquet (write path alone)",
            memory_n,
            memory_s,
            memory_n / memory_s,
            "",
        ],
        [
            f"export grouped by tenant and day ({len(result.rows):,} rows, "
            f"{result.totals['requests']:,} requests after de-duplication)",
            args.export_records,
            export_s,
            args.export_records / export_s,
            f"< {EXPORT_TARGET_S:.0f} s",
        ],
    ]
    table = markdown_table(["measure", "records", "seconds", "records/s", "target"], rows)
    print(table)
    if args.no_write:
        return
    write_section(
        "ledger",
        f"""## Usage ledger (`bench/ledger.py`)

{machine}

Drain: {args.drain_records:,} records over 50 tenants' streams, one drainer,
batches of 50,000. Export: {args.export_records:,} synthetic records over
{args.days} days and {args.tenants} tenants (one compacted file per day, 0.1%
flagged for de-duplication), median of three runs; DuckDB on every core.

{table}
""",
    )


if __name__ == "__main__":
    main()
