"""A circuit breaker around a remote quota store, so no request hangs on it.

Every call gets a hard deadline (on top of the client's socket timeouts).
After `failure_threshold` consecutive failures the breaker opens: calls fail
at once with `StoreUnavailableError` for `reset_after_s`, then one probe call
is let through (half-open); its success closes the breaker, its failure opens
it again. Recovery after Redis comes back is therefore automatic, within one
`reset_after_s`.

    closed --N failures--> open --reset_after_s--> half-open --ok--> closed
                             ^                         |
                             +--------failure----------+
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, TypeVar

import structlog

from gateway.quota.limits import Reservation, Scope
from gateway.quota.store import (
    Admission,
    Lease,
    QuotaStore,
    ScopeUsage,
    StoreUnavailableError,
)
from gateway.usage.record import UsageEntry

log = structlog.get_logger("tollgate.quota")
T = TypeVar("T")
State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """The state machine alone, with an injectable clock."""

    def __init__(
        self,
        *,
        failure_threshold: int = 3,
        reset_after_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self._clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self._state: State = "closed"
        self._probing = False
        self.trips = 0
        """Times the breaker opened from closed (a failed probe reopening it
        is the same outage, not a new trip)."""

    @property
    def state(self) -> State:
        """`closed`, `open`, or `half_open` (the cool-down has passed)."""
        if self._state == "open" and self._clock() - self._opened_at >= self.reset_after_s:
            return "half_open"
        return self._state

    def retry_after_s(self) -> float:
        """Seconds until the breaker lets a call through again."""
        if self._state != "open":
            return 0.0
        return max(0.0, self.reset_after_s - (self._clock() - self._opened_at))

    def allow(self) -> bool:
        """Whether a call may go to the store now (claims the probe when half-open)."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probing:
            self._probing = True
            return True
        return False

    def succeeded(self) -> None:
        """A call returned: close."""
        if self._state != "closed":
            log.info("quota_store_recovered")
        self._state = "closed"
        self._failures = 0
        self._probing = False

    def failed(self) -> None:
        """A call failed or timed out: count it, open at the threshold (a failed
        probe reopens at once)."""
        self._failures += 1
        probe, self._probing = self._probing, False
        if probe or (self._state == "closed" and self._failures >= self.failure_threshold):
            if self._state == "closed":
                self.trips += 1
                log.warning("quota_store_circuit_open", failures=self._failures)
            self._state = "open"
            self._opened_at = self._clock()

    def abandoned(self) -> None:
        """A call was cancelled by its caller: no verdict, but free the probe."""
        self._probing = False


class GuardedStore:
    """A `QuotaStore` whose calls are bounded in time and pass a breaker.

    Any failure surfaces as `StoreUnavailableError`; the caller decides
    what that means for the tenant (`on_store_failure`).
    """

    def __init__(self, inner: QuotaStore, breaker: CircuitBreaker, *, timeout_s: float) -> None:
        # Imported here: only a remote (Redis) store is guarded, and a gateway
        # on the memory store never loads the redis client.
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import RedisError

        self.inner = inner
        self.breaker = breaker
        self.timeout_s = timeout_s
        self._failures = (RedisError, OSError, TimeoutError, ConnectionError)
        self._connection_error = RedisConnectionError

    async def _call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        if not self.breaker.allow():
            raise StoreUnavailableError(
                "the quota store is unavailable (circuit open)",
                retry_after_s=max(self.breaker.retry_after_s(), 0.1),
                attempted=False,
            )
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await call()
        except self._failures as exc:
            self.breaker.failed()
            log.warning("quota_store_error", op=what, error=type(exc).__name__)
            if isinstance(exc, self._connection_error):
                # After a restart every idle pooled connection is dead; drop
                # them together, or each would fail one probe in turn and
                # keep the breaker open long after Redis is back.
                reset = getattr(self.inner, "reset_connections", None)
                if reset is not None:
                    await reset()
            raise StoreUnavailableError(
                f"the quota store failed: {type(exc).__name__}",
                retry_after_s=max(self.breaker.retry_after_s(), 0.1),
            ) from exc
        except BaseException:
            # Cancelled by our caller: says nothing about the store's health,
            # but a half-open probe must not stay claimed forever.
            self.breaker.abandoned()
            raise
        self.breaker.succeeded()
        return result

    async def admit(self, reservation: Reservation) -> Admission:
        """See `QuotaStore.admit`."""
        return await self._call("admit", lambda: self.inner.admit(reservation))

    async def settle(
        self, lease: Lease, actual_tokens: int, usage: UsageEntry | None = None
    ) -> bool:
        """See `QuotaStore.settle`."""
        return await self._call("settle", lambda: self.inner.settle(lease, actual_tokens, usage))

    async def release(self, lease: Lease, usage: UsageEntry | None = None) -> bool:
        """See `QuotaStore.release`."""
        return await self._call("release", lambda: self.inner.release(lease, usage))

    async def append(self, tenant_id: str, usage: UsageEntry) -> None:
        """See `QuotaStore.append`."""
        await self._call("append", lambda: self.inner.append(tenant_id, usage))

    async def sweep(self) -> int:
        """See `QuotaStore.sweep` (not bounded by the call deadline: it is
        the drainer's, on its own connection, not a request's)."""
        return await self.inner.sweep()

    async def renew(self, leases: Sequence[Lease]) -> int:
        """See `QuotaStore.renew`."""
        return await self._call("renew", lambda: self.inner.renew(leases))

    async def peek(self, scope: Scope) -> ScopeUsage:
        """See `QuotaStore.peek`."""
        return await self._call("peek", lambda: self.inner.peek(scope))

    async def ping(self) -> None:
        """See `QuotaStore.ping` (through the breaker: an open circuit fails at once)."""
        await self._call("ping", self.inner.ping)

    async def close(self) -> None:
        """Close the inner store."""
        await self.inner.close()
