"""The drainer: moves usage records from the store into the Parquet ledger.

Every `interval_s`, the drainer that holds the lock (`UsageSource.acquire`):

1. sweeps expired leases, so a request whose gateway died gets its
   `interrupted` record even if its tenant sends nothing more;
2. reads records in batches, marks each batch, writes it durably
   (`Ledger.write`: fsynced file, renamed, folder fsynced) and only then
   acknowledges it in the store;
3. once an hour, merges small files and deletes day folders past retention.

It runs as a task in every gateway process (one is active at a time across
replicas) or on its own as `tollgate usage drain`. On shutdown it drains
once more: with the memory store, that is what flushes the buffer.

Ledger writes run in one thread of the drainer's own (DuckDB), never on the
event loop. One thread, not the loop's shared pool: glibc gives each thread
that allocates its own malloc arena and keeps freed memory mapped there, so
DuckDB's buffers spread over the pool's threads stayed resident in each
(measured with `bench/gateway_overhead.py`'s workload, about 50,000 requests
then 1,000 streams held at once, three runs each: peak RSS 186.5 to 188.0
MiB with the shared pool, 177.6 to 180.0 MiB with one writer thread).

For the fault tests only: `TOLLGATE_LEDGER_CRASH_AFTER_WRITE=1` makes the
process kill itself (SIGKILL) after writing a batch and before acknowledging
it, the window where a crash leaves duplicates on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import structlog

from gateway.quota.admission import Quota
from gateway.quota.memory import MemoryQuotaStore
from gateway.settings import GatewaySettings
from gateway.usage.ledger import Ledger
from gateway.usage.sources import LostLeadershipError, MemoryUsageSource, UsageSource

log = structlog.get_logger("tollgate.usage")

CRASH_ENV = "TOLLGATE_LEDGER_CRASH_AFTER_WRITE"
BATCH_SIZE = 50_000
MAINTAIN_EVERY_S = 3600.0

T = TypeVar("T")


class Drainer:
    """One process's drainer (active only while it holds the source's lock)."""

    def __init__(
        self,
        source: UsageSource,
        ledger: Ledger,
        *,
        interval_s: float,
        retention_days: int = 0,
        batch_size: int = BATCH_SIZE,
        crash_after_write: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self.ledger = ledger
        self.interval_s = interval_s
        self.retention_days = retention_days
        self.batch_size = batch_size
        self._crash_after_write = crash_after_write
        self._clock = clock
        self._next_maintenance = 0.0
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tollgate-ledger")
        self.drained = 0
        """Records written and acknowledged by this drainer."""

    async def drain_once(self) -> int:
        """One round (see the module docstring); returns the records drained."""
        async with self._lock:
            return await self._round()

    async def _round(self) -> int:
        if not await self.source.acquire():
            return 0
        try:
            await self.source.sweep()
        except Exception:
            log.exception("usage_sweep_failed")
        total = 0
        while True:
            batch = await self.source.read(self.batch_size)
            if not batch.lines:
                break
            try:
                await self.source.mark(batch)
            except LostLeadershipError:
                log.info("usage_drainer_lost_lock")
                return total
            await self._in_writer(self.ledger.write, batch.lines)
            if self._crash_after_write:
                os.kill(os.getpid(), signal.SIGKILL)
            await self.source.ack(batch)
            total += len(batch.lines)
            if len(batch.lines) < self.batch_size or not await self.source.acquire():
                break
        self.drained += total
        maintained = self._clock() >= self._next_maintenance
        if maintained:
            self._next_maintenance = self._clock() + MAINTAIN_EVERY_S
            today = dt.datetime.fromtimestamp(self._clock(), dt.UTC).date()
            await self._in_writer(self.ledger.maintain, today, self.retention_days)
        if total or maintained:
            # Between rounds an open DuckDB connection holds over 10 MB of
            # buffers in the gateway process for nothing (measured holding
            # 1,000 streams); reopening it costs about 10 ms of a worker
            # thread per round, and closing it about 2 ms: off the loop too.
            await self._in_writer(self.ledger.close)
        return total

    async def _in_writer(self, call: Callable[..., T], *args: object) -> T:
        """Run a blocking ledger call on the drainer's writer thread."""
        return await asyncio.get_running_loop().run_in_executor(self._writer, call, *args)

    async def _run(self) -> None:
        while True:
            try:
                await self.drain_once()
            except Exception:
                log.exception("usage_drain_failed")
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        """Run rounds every `interval_s` on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop the loop, drain one last time (flushes a memory buffer), give
        up the lock, close."""
        if self._task is not None:
            # Cancel between rounds, never inside one: a round cut after its
            # file is written but before the acknowledgement would leave its
            # records in the store, and the final drain would write them again.
            async with self._lock:
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self.drain_once()
        except Exception:
            log.exception("usage_final_drain_failed")
        with contextlib.suppress(Exception):
            await self.source.release()
        await self.source.close()
        self.ledger.close()
        self._writer.shutdown(wait=False)


def build_drainer(settings: GatewaySettings, quota: Quota | None = None) -> Drainer:
    """The drainer for the configured store: the memory store's buffer (it
    needs the gateway's `quota`), or the Redis streams on a connection of its own."""
    source: UsageSource
    if settings.store == "redis":
        from gateway.quota.redis_store import RedisQuotaStore, connect
        from gateway.usage.sources import RedisUsageSource

        # Its own connection, with room for batches of many records.
        client = connect(settings.redis_url, timeout_s=max(5.0, settings.redis_timeout_s))
        store = RedisQuotaStore(client, lease_ttl_s=settings.quota_lease_ttl_s)
        lock_ttl = max(settings.ledger_lock_ttl_s, 2 * settings.ledger_drain_interval_s)
        source = RedisUsageSource(client, store, lock_ttl_s=lock_ttl)
    else:
        if quota is None or not isinstance(quota.store, MemoryQuotaStore):
            raise ValueError("the memory store's records can only be drained by its gateway")
        source = MemoryUsageSource(quota.store)
    return Drainer(
        source,
        Ledger(settings.ledger_dir),
        interval_s=settings.ledger_drain_interval_s,
        retention_days=settings.ledger_retention_days,
        crash_after_write=os.environ.get(CRASH_ENV) == "1",
    )
