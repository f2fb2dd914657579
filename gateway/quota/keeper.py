"""Keeps this process's leases alive, and finishes them even when a request
is cancelled or the store blips.

- Renewal: every lease in flight is renewed every TTL/3, so the TTL can be
  short (a killed gateway's reservations come back quickly) while a request
  may run for as long as its pool allows. Renewal stops at the request's
  horizon (queue wait + upstream deadline), so a lease whose request somehow
  never finished still expires.
- Finishing: settle and release run as tasks owned here, not by the request:
  a client that disconnects cancels the request's task, and the settlement
  must still happen. A settle or release that fails because the store is
  unavailable is retried on each tick until the lease's TTL has passed (by
  then the store has reclaimed it, and a retry would be a no-op).
- Usage records travel with the settlement (`gateway.usage`); a record
  without a lease (`append`, for requests served `fail_open`) is retried the
  same way, for one TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from gateway.quota.store import Lease, QuotaStore, StoreUnavailableError
from gateway.usage.record import UsageEntry

log = structlog.get_logger("tollgate.quota")

MAX_PENDING = 10_000
"""Settlements kept for retry while the store is down; past this, a lease is
left to expire (its reservation is then refunded by the store)."""


@dataclass(slots=True)
class _Pending:
    lease: Lease
    actual_tokens: int | None
    give_up_at: float
    usage: UsageEntry | None = None
    append_only: bool = False
    """No lease to finish: only `usage` to append."""


def _key(lease: Lease, append_only: bool) -> str:
    """Pending work per lease: its settlement, and apart from it an append."""
    return ("append:" if append_only else "") + lease.lease_id


class LeaseKeeper:
    """Renews live leases and runs (and retries) their settlements."""

    def __init__(
        self,
        store: QuotaStore,
        *,
        lease_ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._ttl = lease_ttl_s
        self.interval_s = lease_ttl_s / 3
        self._clock = clock
        self._live: dict[str, tuple[Lease, float]] = {}
        self._pending: dict[str, _Pending] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None

    @property
    def live(self) -> int:
        """Leases in flight in this process."""
        return len(self._live)

    def track(self, lease: Lease, horizon_s: float) -> None:
        """Renew `lease` until it is finished or `horizon_s` from now."""
        self._live[lease.lease_id] = (lease, self._clock() + horizon_s)

    def finish(
        self, lease: Lease, actual_tokens: int | None, usage: UsageEntry | None = None
    ) -> asyncio.Task[None]:
        """Settle with `actual_tokens` (or release when None) in a task owned
        here, appending `usage`; the caller may await it, and may be
        cancelled meanwhile."""
        self._live.pop(lease.lease_id, None)
        return self._spawn(self._finish(lease, actual_tokens, usage))

    def append(self, lease: Lease, usage: UsageEntry) -> asyncio.Task[None]:
        """Append `usage` for a request that holds no lease in the store
        (`lease` only names it), retried like a settlement."""
        return self._spawn(self._append(lease, usage))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _keep_for_retry(self, pending: _Pending) -> None:
        key = _key(pending.lease, pending.append_only)
        if key not in self._pending and len(self._pending) < MAX_PENDING:
            self._pending[key] = pending
        elif pending.append_only and key not in self._pending:
            log.error("usage_record_dropped", tenant=pending.lease.tenant_id)

    async def _append(self, lease: Lease, usage: UsageEntry) -> None:
        try:
            await self._store.append(lease.tenant_id, usage)
        except StoreUnavailableError:
            give_up = self._clock() + self._ttl
            self._keep_for_retry(_Pending(lease, None, give_up, usage, append_only=True))
            return
        except Exception:
            log.exception("usage_append_failed", lease=lease.lease_id)
            return
        self._pending.pop(_key(lease, True), None)

    async def _finish(
        self, lease: Lease, actual_tokens: int | None, usage: UsageEntry | None = None
    ) -> None:
        try:
            if actual_tokens is None:
                known = await self._store.release(lease, usage=usage)
            else:
                known = await self._store.settle(lease, actual_tokens, usage=usage)
        except StoreUnavailableError:
            self._keep_for_retry(_Pending(lease, actual_tokens, self._clock() + self._ttl, usage))
            return
        except Exception:
            log.exception("quota_finish_failed", lease=lease.lease_id)
            return
        self._pending.pop(lease.lease_id, None)
        if not known:
            # Expired and reclaimed (or the store lost its data): the
            # reservation was already refunded; nothing to count twice.
            log.info("quota_lease_unknown_at_settle", tenant=lease.tenant_id, lease=lease.lease_id)

    async def tick(self) -> None:
        """One round of renewals and retries (the loop calls this every TTL/3)."""
        now = self._clock()
        for lease_id, (_, horizon) in list(self._live.items()):
            if horizon <= now:
                del self._live[lease_id]
        if self._live:
            leases = [lease for lease, _ in self._live.values()]
            with contextlib.suppress(StoreUnavailableError):
                await self._store.renew(leases)
        for key, pending in list(self._pending.items()):
            if pending.give_up_at <= now:
                del self._pending[key]
                log.warning(
                    "quota_finish_abandoned",
                    tenant=pending.lease.tenant_id,
                    usage_record_lost=pending.append_only,
                )
            elif pending.append_only and pending.usage is not None:
                await self._append(pending.lease, pending.usage)
            else:
                await self._finish(pending.lease, pending.actual_tokens, pending.usage)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.tick()
            except Exception:
                log.exception("quota_keeper_tick_failed")

    def start(self) -> None:
        """Start the renewal loop on the running event loop."""
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop renewing; wait (bounded) for settlements still running."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
