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
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from gateway.quota.store import Lease, QuotaStore, StoreUnavailableError

log = structlog.get_logger("tollgate.quota")

MAX_PENDING = 10_000
"""Settlements kept for retry while the store is down; past this, a lease is
left to expire (its reservation is then refunded by the store)."""


@dataclass(slots=True)
class _Pending:
    lease: Lease
    actual_tokens: int | None
    give_up_at: float


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

    def finish(self, lease: Lease, actual_tokens: int | None) -> asyncio.Task[None]:
        """Settle with `actual_tokens` (or release when None) in a task owned
        here; the caller may await it, and may be cancelled meanwhile."""
        self._live.pop(lease.lease_id, None)
        task = asyncio.get_running_loop().create_task(self._finish(lease, actual_tokens))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _finish(self, lease: Lease, actual_tokens: int | None) -> None:
        try:
            if actual_tokens is None:
                known = await self._store.release(lease)
            else:
                known = await self._store.settle(lease, actual_tokens)
        except StoreUnavailableError:
            earlier = self._pending.get(lease.lease_id)
            if earlier is None and len(self._pending) < MAX_PENDING:
                self._pending[lease.lease_id] = _Pending(
                    lease, actual_tokens, self._clock() + self._ttl
                )
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
        for lease_id, pending in list(self._pending.items()):
            if pending.give_up_at <= now:
                del self._pending[lease_id]
                log.warning("quota_finish_abandoned", tenant=pending.lease.tenant_id)
            else:
                await self._finish(pending.lease, pending.actual_tokens)

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
