"""The `QuotaStore` seam: one protocol, two implementations (`memory`,
`redis`), one contract suite (`tests/unit/gateway/quota`).

A store keeps, per scope (see `gateway.quota.limits`): a sliding 60-second
log of admitted requests and their tokens (requests_per_minute,
tokens_per_minute), a count of leases in flight (max_concurrent), and token
totals per calendar day and month. Its four operations:

- `admit`: all or nothing. Either every limit of every scope has room for the
  reservation (its tokens, one request, one concurrency slot) and all of it is
  charged under a new lease, or nothing is charged and the `Admission` says
  which limits refused and when to retry.
- `settle`: the request finished; its actual tokens replace the reserved ones
  (the difference is refunded, or charged when the backend used more than the
  estimate) and the concurrency slot is freed. Idempotent.
- `release`: the request never reached a backend; everything is refunded.
  Idempotent, and a no-op after `settle`.
- `renew`: push the leases' expiry one TTL further (the gateway's lease keeper
  does this for requests still in flight).

A lease that is neither settled nor renewed within the store's TTL (its
gateway was killed) is reclaimed on the next admit for its tenant, exactly as
`release` would, or by `sweep`, which the ledger's drainer runs periodically.

Usage records (`gateway.usage`): `settle` and `release` take the request's
record and append it in the same atomic step; `admit` keeps the request's
open record with the lease, and reclaiming an expired lease appends it as an
`interrupted` record. `append` adds a record without a lease (a request
served `fail_open`). Where the records go is the store's: a Redis Stream per
tenant, or an in-process buffer (`gateway.usage.sources`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from gateway.quota.limits import BUDGETS, WINDOW_S, Reservation, Scope
from gateway.usage.record import UsageEntry

WINDOW_KINDS = frozenset({"requests_per_minute", "tokens_per_minute"})
PER_REQUEST_KINDS = frozenset({"requests_per_minute", "max_concurrent"})
"""Kinds that count requests (one per admit) rather than tokens."""


class StoreUnavailableError(Exception):
    """The store did not answer (in time); the caller applies the tenant's
    `on_store_failure`. `retry_after_s` is when it is worth trying again."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0, attempted: bool = True) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.attempted = attempted
        """False when the call was refused without reaching the store (open circuit)."""


@dataclass(frozen=True, slots=True)
class Lease:
    """A granted reservation, to be settled or released exactly once."""

    tenant_id: str
    lease_id: str
    tokens: int
    """The tokens reserved at admission."""


class Figure(NamedTuple):
    """Where one limit of one scope stands, as of an admit.

    A named tuple rather than a frozen dataclass: several are built on every
    request, and tuples are several times cheaper to make.
    """

    kind: str
    """One of `gateway.quota.limits.COUNTED`."""
    scope: str
    """The scope's label, for messages."""
    limit: int
    used: int
    """Including this request when it was admitted, excluding it when refused."""
    reset_s: float
    """Seconds until the counter is back to zero: the sliding window empties,
    the day or month ends (0 for concurrency)."""
    retry_after_s: float | None = None
    """Set only on a limit the request did not fit: seconds until it would."""
    never_fits: bool = False
    """The request alone is over this limit: waiting will not help."""

    @property
    def remaining(self) -> int:
        """How much of the limit is left (never negative)."""
        return max(0, self.limit - self.used)

    @property
    def refused(self) -> bool:
        """Whether this limit refused the request."""
        return self.retry_after_s is not None

    @property
    def code(self) -> str:
        """OpenAI's error code for a refusal by this limit."""
        return "insufficient_quota" if self.kind in BUDGETS else "rate_limit_exceeded"


def charged(figure: Figure, tokens: int) -> Figure:
    """`figure` (taken before charging) once a request of `tokens` is admitted:
    its counter grows, and a sliding window now resets a full window away."""
    increment = 1 if figure.kind in PER_REQUEST_KINDS else tokens
    reset = WINDOW_S if figure.kind in WINDOW_KINDS else figure.reset_s
    return Figure(figure.kind, figure.scope, figure.limit, figure.used + increment, reset)


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer to `admit`: a lease, or the limits that refused."""

    lease: Lease | None
    figures: tuple[Figure, ...] = ()

    @property
    def allowed(self) -> bool:
        """Whether the reservation was granted."""
        return self.lease is not None

    @property
    def refusals(self) -> tuple[Figure, ...]:
        """The limits the request did not fit (empty when allowed)."""
        return tuple(f for f in self.figures if f.refused)

    @property
    def retry_after_s(self) -> float:
        """When every refusing limit would have room: the latest of them."""
        return max((f.retry_after_s or 0.0 for f in self.refusals), default=0.0)

    @property
    def decisive(self) -> Figure | None:
        """The refusal to report: a budget before a rate (it is the one that
        needs action), then the longest wait."""
        refusals = self.refusals
        if not refusals:
            return None
        return max(refusals, key=lambda f: (f.kind in BUDGETS, f.retry_after_s or 0.0))


@dataclass(frozen=True, slots=True)
class ScopeUsage:
    """A read-only look at one scope's counters (for tests and operators)."""

    requests: int
    """Requests admitted in the last 60 seconds."""
    tokens: int
    """Tokens charged in the last 60 seconds."""
    concurrent: int
    day_tokens: int
    month_tokens: int


class QuotaStore(Protocol):
    """Atomic admission and settlement against every limit of a request."""

    async def admit(self, reservation: Reservation) -> Admission:
        """Charge the reservation against all its scopes, or nothing."""
        ...

    async def settle(
        self, lease: Lease, actual_tokens: int, usage: UsageEntry | None = None
    ) -> bool:
        """Replace the reserved tokens with `actual_tokens` and free the slot,
        and append `usage` in the same step.

        Returns False when the lease is unknown (already settled or released,
        or reclaimed after its TTL); nothing is counted then, and `usage` is
        still appended (flagged for de-duplication) unless it is
        `only_if_known`: a late record knows more than an interrupted one.
        """
        ...

    async def release(self, lease: Lease, usage: UsageEntry | None = None) -> bool:
        """Refund everything the lease reserved (appending `usage` as `settle`
        does); False when it is unknown."""
        ...

    async def append(self, tenant_id: str, usage: UsageEntry) -> None:
        """Append a usage record that belongs to no lease."""
        ...

    async def sweep(self) -> int:
        """Reclaim every tenant's expired leases (appending their interrupted
        records); returns how many were reclaimed."""
        ...

    async def renew(self, leases: Sequence[Lease]) -> int:
        """Extend the leases by one TTL; returns how many were still live."""
        ...

    async def peek(self, scope: Scope) -> ScopeUsage:
        """The scope's counters now, without changing anything."""
        ...

    async def ping(self) -> None:
        """Return when the store answers; raise when it does not (readiness)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
