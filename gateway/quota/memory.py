"""The in-process quota store: the embedded default for one gateway process.

Every operation runs without an `await`, so on one event loop it is atomic
by construction. Counters live in this process only: several worker
processes (or replicas) would each allow the full limit, which is why the
settings refuse `workers > 1` with this store.

Usage records go to `usage_buffer`, in order, where the ledger's drainer
(`gateway.usage.sources.MemoryUsageSource`) takes them from; it flushes
the buffer on shutdown. A process that is killed loses what it had not
drained yet, and its leases with it: only Redis survives a gateway.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gateway.quota.limits import WINDOW_S, Reservation, Scope
from gateway.quota.periods import PeriodCache, Unit
from gateway.quota.store import Admission, Figure, Lease, ScopeUsage, charged
from gateway.usage.record import UsageEntry, close_open_record

CONCURRENCY_RETRY_S = 1.0
"""Retry-After for a full concurrency limit: a slot frees when some request
ends, which no counter can predict."""


@dataclass(slots=True)
class _Entry:
    at: float
    lease_id: str
    tokens: int
    live: bool = True


@dataclass(slots=True)
class _Window:
    """A sliding log of the last `WINDOW_S` seconds of admissions."""

    entries: deque[_Entry] = field(default_factory=deque)
    by_lease: dict[str, _Entry] = field(default_factory=dict)
    count: int = 0
    total: int = 0

    def trim(self, now: float) -> None:
        """Drop entries admitted `WINDOW_S` or more ago."""
        cutoff = now - WINDOW_S
        while self.entries and self.entries[0].at <= cutoff:
            entry = self.entries.popleft()
            self.by_lease.pop(entry.lease_id, None)
            if entry.live:
                self.count -= 1
                self.total -= entry.tokens

    def reset_s(self, now: float) -> float:
        """Seconds until the window is empty (a minute after the newest entry)."""
        newest = next((e.at for e in reversed(self.entries) if e.live), None)
        return 0.0 if newest is None else max(0.0, newest + WINDOW_S - now)

    def wait_for_requests(self, now: float, limit: int) -> float:
        """Seconds until one more request fits under `limit`."""
        to_free = self.count - (limit - 1)
        for entry in self.entries:
            if entry.live:
                to_free -= 1
                if to_free <= 0:
                    return max(0.0, entry.at + WINDOW_S - now)
        return 0.0

    def wait_for_tokens(self, now: float, limit: int, tokens: int) -> float:
        """Seconds until `tokens` more fit under `limit` (needs tokens <= limit)."""
        excess = self.total + tokens - limit
        for entry in self.entries:
            if entry.live:
                excess -= entry.tokens
                if excess <= 0:
                    return max(0.0, entry.at + WINDOW_S - now)
        return 0.0

    def _forget(self, lease_id: str) -> _Entry | None:
        # A lease is settled or released once: after that its entry only
        # counts until it leaves the window, so the window stops indexing it
        # and drops its id. A minute of finished requests is what a busy
        # gateway holds here (tens of thousands), so this keeps it small.
        entry = self.by_lease.pop(lease_id, None)
        if entry is not None:
            entry.lease_id = ""
        return entry

    def remove(self, lease_id: str) -> None:
        """Take a lease's entry out (refund its request and tokens); the lease's last change."""
        entry = self._forget(lease_id)
        if entry is not None and entry.live:
            entry.live = False
            self.count -= 1
            self.total -= entry.tokens
            entry.tokens = 0

    def adjust(self, lease_id: str, delta: int) -> None:
        """Settle a lease's tokens by `delta` while it is in the window; the
        lease's last change."""
        entry = self._forget(lease_id)
        if entry is not None and entry.live:
            entry.tokens += delta
            self.total += delta


@dataclass(slots=True)
class _Record:
    lease: Lease
    expires_at: float
    windows: list[str]
    slots: list[str]
    budgets: list[str]
    usage: UsageEntry | None = None


@dataclass(slots=True)
class _Tenant:
    leases: dict[str, _Record] = field(default_factory=dict)
    expiries: list[tuple[float, str]] = field(default_factory=list)
    """A heap with stale entries (renewals push anew); checked against the record."""


class MemoryQuotaStore:
    """`QuotaStore` in this process's memory."""

    def __init__(self, *, lease_ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self._ttl = lease_ttl_s
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._slots: dict[str, int] = {}
        self._budgets: dict[str, int] = {}
        self._recent_periods: dict[str, deque[str]] = {}
        self._tenants: dict[str, _Tenant] = {}
        self._periods = PeriodCache()
        self.usage_buffer: deque[UsageEntry] = deque()
        """Usage records not yet drained into the ledger, oldest first."""

    async def admit(self, reservation: Reservation) -> Admission:
        """See `QuotaStore.admit`."""
        now = self._clock()
        tenant = self._tenants.setdefault(reservation.tenant_id, _Tenant())
        self._reclaim(tenant, now)
        lease = Lease(reservation.tenant_id, reservation.lease_id, reservation.tokens)
        if reservation.lease_id in tenant.leases:
            return Admission(tenant.leases[reservation.lease_id].lease)
        cost = reservation.tokens
        checks: list[Figure] = []
        for scope in reservation.scopes:
            checks.extend(self._check(scope, now, cost))
        allowed = not any(figure.refused for figure in checks)
        if not allowed:
            return Admission(None, tuple(checks))
        record = _Record(lease, now + self._ttl, [], [], [], reservation.usage)
        for scope in reservation.scopes:
            self._charge(scope, record, now, cost)
        tenant.leases[lease.lease_id] = record
        heapq.heappush(tenant.expiries, (record.expires_at, lease.lease_id))
        figures = tuple(charged(figure, cost) for figure in checks)
        return Admission(lease, figures)

    def _check(self, scope: Scope, now: float, cost: int) -> list[Figure]:
        """Figures for every limit of `scope`, before charging anything."""
        out: list[Figure] = []
        label = scope.label
        rpm, tpm = scope.requests_per_minute, scope.tokens_per_minute
        if rpm is not None or tpm is not None:
            window = self._windows.setdefault(scope.key + ":win", _Window())
            window.trim(now)
            reset = window.reset_s(now)
            if rpm is not None:
                retry = window.wait_for_requests(now, rpm) if window.count + 1 > rpm else None
                out.append(Figure("requests_per_minute", label, rpm, window.count, reset, retry))
            if tpm is not None:
                never = cost > tpm
                retry = None
                if window.total + cost > tpm:
                    retry = WINDOW_S if never else window.wait_for_tokens(now, tpm, cost)
                out.append(
                    Figure("tokens_per_minute", label, tpm, window.total, reset, retry, never)
                )
        if scope.max_concurrent is not None:
            used = self._slots.get(scope.key + ":conc", 0)
            retry = CONCURRENCY_RETRY_S if used + 1 > scope.max_concurrent else None
            out.append(Figure("max_concurrent", label, scope.max_concurrent, used, 0.0, retry))
        for unit, kind, limit in _budgets(scope):
            period = self._periods.at(unit, now, scope.time_zone)
            used = self._budgets.get(_budget_key(scope, unit, period.label), 0)
            reset = max(0.0, period.end_s - now)
            retry = reset if used + cost > limit else None
            out.append(Figure(kind, label, limit, used, reset, retry, cost > limit))
        return out

    def _charge(self, scope: Scope, record: _Record, now: float, cost: int) -> None:
        lease_id = record.lease.lease_id
        if scope.requests_per_minute is not None or scope.tokens_per_minute is not None:
            key = scope.key + ":win"
            window = self._windows[key]
            entry = _Entry(now, lease_id, cost)
            window.entries.append(entry)
            window.by_lease[lease_id] = entry
            window.count += 1
            window.total += cost
            record.windows.append(key)
        if scope.max_concurrent is not None:
            key = scope.key + ":conc"
            self._slots[key] = self._slots.get(key, 0) + 1
            record.slots.append(key)
        for unit, _, _ in _budgets(scope):
            key = _budget_key(scope, unit, self._periods.at(unit, now, scope.time_zone).label)
            self._remember_period(scope.key + ":" + unit, key)
            self._budgets[key] = self._budgets.get(key, 0) + cost
            record.budgets.append(key)

    def _remember_period(self, series: str, key: str) -> None:
        # Keep the current and the previous period (a request admitted just
        # before midnight settles into the day it was admitted); forget older.
        recent = self._recent_periods.setdefault(series, deque())
        if key in recent:
            return
        recent.append(key)
        while len(recent) > 2:
            self._budgets.pop(recent.popleft(), None)

    async def settle(
        self, lease: Lease, actual_tokens: int, usage: UsageEntry | None = None
    ) -> bool:
        """See `QuotaStore.settle`."""
        return self._finish(lease, max(0, actual_tokens), usage)

    async def release(self, lease: Lease, usage: UsageEntry | None = None) -> bool:
        """See `QuotaStore.release`."""
        return self._finish(lease, None, usage)

    async def append(self, tenant_id: str, usage: UsageEntry) -> None:
        """See `QuotaStore.append`."""
        self.usage_buffer.append(usage)

    def _finish(self, lease: Lease, actual_tokens: int | None, usage: UsageEntry | None) -> bool:
        tenant = self._tenants.get(lease.tenant_id)
        record = tenant.leases.pop(lease.lease_id, None) if tenant is not None else None
        if tenant is None or record is None:
            if usage is not None and not usage.only_if_known:
                self.usage_buffer.append(_flagged(usage))
            return False
        self._undo(record, actual_tokens)
        if usage is not None:
            self.usage_buffer.append(usage)
        _drop_stale_expiries(tenant)
        return True

    def _undo(self, record: _Record, actual_tokens: int | None) -> None:
        """Settle (`actual_tokens`) or refund everything (None)."""
        lease_id = record.lease.lease_id
        delta = (
            -record.lease.tokens if actual_tokens is None else actual_tokens - record.lease.tokens
        )
        for key in record.windows:
            window = self._windows.get(key)
            if window is None:
                continue
            if actual_tokens is None:
                window.remove(lease_id)
            else:
                window.adjust(lease_id, delta)
        for key in record.budgets:
            # A forgotten period has nothing left to correct (as in Redis).
            if key in self._budgets:
                self._budgets[key] = max(0, self._budgets[key] + delta)
        for key in record.slots:
            left = self._slots.get(key, 0) - 1
            if left > 0:
                self._slots[key] = left
            else:
                self._slots.pop(key, None)

    async def renew(self, leases: Sequence[Lease]) -> int:
        """See `QuotaStore.renew`."""
        now = self._clock()
        renewed = 0
        for lease in leases:
            tenant = self._tenants.get(lease.tenant_id)
            record = tenant.leases.get(lease.lease_id) if tenant is not None else None
            if tenant is None or record is None:
                continue
            record.expires_at = now + self._ttl
            heapq.heappush(tenant.expiries, (record.expires_at, lease.lease_id))
            renewed += 1
        return renewed

    def _reclaim(self, tenant: _Tenant, now: float) -> int:
        """Refund leases whose TTL passed (their gateway never came back) and
        append their interrupted records; returns how many."""
        reclaimed = 0
        while tenant.expiries and tenant.expiries[0][0] <= now:
            _, lease_id = heapq.heappop(tenant.expiries)
            record = tenant.leases.get(lease_id)
            if record is not None and record.expires_at <= now:
                del tenant.leases[lease_id]
                self._undo(record, None)
                reclaimed += 1
                if record.usage is not None:
                    self.usage_buffer.append(_closed(record.usage, now))
        return reclaimed

    async def sweep(self) -> int:
        """See `QuotaStore.sweep`."""
        now = self._clock()
        return sum(self._reclaim(tenant, now) for tenant in self._tenants.values())

    async def peek(self, scope: Scope) -> ScopeUsage:
        """See `QuotaStore.peek`."""
        now = self._clock()
        window = self._windows.get(scope.key + ":win")
        requests = tokens = 0
        if window is not None:
            live = [e for e in window.entries if e.live and e.at > now - WINDOW_S]
            requests, tokens = len(live), sum(e.tokens for e in live)

        def budget(unit: Unit) -> int:
            label = self._periods.at(unit, now, scope.time_zone).label
            return self._budgets.get(_budget_key(scope, unit, label), 0)

        return ScopeUsage(
            requests=requests,
            tokens=tokens,
            concurrent=self._slots.get(scope.key + ":conc", 0),
            day_tokens=budget("day"),
            month_tokens=budget("month"),
        )

    async def ping(self) -> None:
        """In this process: always answers."""

    async def close(self) -> None:
        """Nothing to release."""


def _drop_stale_expiries(tenant: _Tenant) -> None:
    """Rebuild the expiry heap once most of it is stale: a finished or renewed
    lease leaves its entry behind until its time comes, so a minute of
    finished requests would otherwise stay in memory. Amortized O(1)."""
    if len(tenant.expiries) > 2 * len(tenant.leases) + 64:
        tenant.expiries = [(r.expires_at, lease_id) for lease_id, r in tenant.leases.items()]
        heapq.heapify(tenant.expiries)


def _flagged(usage: UsageEntry) -> UsageEntry:
    return UsageEntry(usage.day, usage.data, usage.started_ms, check=True)


def _closed(usage: UsageEntry, now: float) -> UsageEntry:
    """An open (interrupted) record, ended now."""
    data = close_open_record(usage.data, round(now * 1000), usage.started_ms)
    return UsageEntry(usage.day, data, usage.started_ms, check=True)


def _budget_key(scope: Scope, unit: Unit, label: str) -> str:
    return f"{scope.key}:{unit}:{label}"


def _budgets(scope: Scope) -> list[tuple[Unit, str, int]]:
    """The calendar budgets `scope` enforces: (unit, kind, limit)."""
    found: list[tuple[Unit, str, int]] = []
    if scope.tokens_per_day is not None:
        found.append(("day", "tokens_per_day", scope.tokens_per_day))
    if scope.tokens_per_month is not None:
        found.append(("month", "tokens_per_month", scope.tokens_per_month))
    return found
