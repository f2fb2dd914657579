"""Every replica's health, load and in-flight bookkeeping, in one place.

A ``ReplicaState`` is one backend endpoint as this gateway process sees it:

- health: ``healthy`` or ``ejected``. ``failures_to_eject`` failed requests
  in a row (could not connect, dropped before answering, 5xx, timed out,
  broke mid-stream), or as many failed probes in a row, eject it for
  ``ejection_base_s``, doubled for each ejection in a row up to
  ``ejection_max_s``. Requests and probes count apart, as passive and active
  checks: a replica that answers its probes but fails every request is
  still ejected. It comes back once that time has passed and
  ``successes_to_restore`` probes in a row have succeeded (a pool without
  probes comes back when the time has passed).
- load: the last reading of its load signal (``gateway.upstream.load``),
  plus the gateway's own estimates of what it sent since (the reading lags
  by up to one polling interval) and of everything it has in flight there
  (for backends that publish no token figures).

The transitions take the time as an argument, so they are tested without
sleeping; the probing and polling loop lives in ``gateway.upstream.monitor``.
Everything here runs on the event loop: no locks.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import structlog

from gateway.policy.compiled import (
    HealthConfig,
    ModelVersion,
    Policy,
    Pool,
    PoolKind,
    Replica,
)
from gateway.routing.picker import ReplicaView
from gateway.upstream.load import ReplicaLoad

log = structlog.get_logger("tollgate.health")

HealthStatus = Literal["healthy", "ejected"]


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One round of active probes."""

    at: float
    """time.monotonic() when it finished."""
    ok: bool
    detail: str
    """What failed (the path and status or error), or "ok"."""


class Ticket:
    """One request in flight on a replica; ``end()`` exactly once (later calls do nothing)."""

    __slots__ = ("_ended", "cost", "started_at", "state")

    def __init__(self, state: ReplicaState, cost: int, started_at: float) -> None:
        self.state = state
        self.cost = cost
        self.started_at = started_at
        self._ended = False

    def end(self) -> None:
        """The request is over: its tokens leave the replica's estimates."""
        if not self._ended:
            self._ended = True
            self.state._end(self)


class ReplicaState:
    """One replica's health, load and in-flight requests (see the module docstring)."""

    def __init__(self, url: str, pool: str, kind: PoolKind, config: HealthConfig) -> None:
        self.url = url
        self.pool = pool
        self.kind = kind
        self.config = config
        self.deep_probe_model: str | None = None
        """The upstream model a deep probe asks for one token of."""
        self.status: HealthStatus = "healthy"
        self.consecutive_failures = 0
        """Failed requests in a row."""
        self.consecutive_probe_failures = 0
        self.consecutive_successes = 0
        """Successful probes in a row while ejected."""
        self.seen_up = False
        """Whether a probe has passed since this process started (readiness)."""
        self.ejected_until = 0.0
        self.ejections_in_row = 0
        self.restored_at: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_probe: ProbeResult | None = None
        self.load: ReplicaLoad | None = None
        self.load_started_at = float("-inf")
        """When the request for the current load reading was sent."""
        self.load_error: str | None = None
        self.in_flight = 0
        self.in_flight_tokens = 0
        self.tokens_since_load = 0
        self._tickets: set[Ticket] = set()
        self.num_requests = 0
        self.num_failures = 0
        self.num_ejections = 0

    # --- health ---------------------------------------------------------------

    @property
    def has_probes(self) -> bool:
        """Whether active probes run (restoration then waits for them)."""
        c = self.config
        return bool(c.liveness_path or c.readiness_path or c.deep_probe_interval_s)

    def routable(self, now: float) -> bool:
        """Whether requests may be sent to it now."""
        if self.status == "healthy":
            return True
        if not self.has_probes and now >= self.ejected_until:
            self._restore(now)
            return True
        return False

    def record_success(self, now: float, *, probe: bool = False) -> None:
        """A request got a usable answer, or a probe round passed."""
        if not probe:
            self.consecutive_failures = 0
            return
        self.seen_up = True
        self.consecutive_probe_failures = 0
        if self.status == "healthy":
            return
        self.consecutive_successes += 1
        if (
            now >= self.ejected_until
            and self.consecutive_successes >= self.config.successes_to_restore
        ):
            self._restore(now)

    def record_failure(self, now: float, reason: str, *, probe: bool = False) -> None:
        """A request or probe failed in a way that points at the replica."""
        self.consecutive_successes = 0
        self.last_error = reason
        self.last_error_at = now
        self.num_failures += 1
        if self.status == "ejected":
            return
        if probe:
            self.consecutive_probe_failures += 1
            count = self.consecutive_probe_failures
        else:
            self.consecutive_failures += 1
            count = self.consecutive_failures
        if count >= self.config.failures_to_eject:
            self._eject(now)

    def _eject(self, now: float) -> None:
        c = self.config
        # Ejections in a row: this one follows a restoration by less than the
        # longest ejection, so the replica is flapping and waits longer.
        recent = self.restored_at is not None and now - self.restored_at < c.ejection_max_s
        self.ejections_in_row = self.ejections_in_row + 1 if recent else 1
        duration = min(c.ejection_base_s * 2 ** (self.ejections_in_row - 1), c.ejection_max_s)
        self.status = "ejected"
        self.ejected_until = now + duration
        self.consecutive_failures = 0
        self.consecutive_probe_failures = 0
        self.consecutive_successes = 0
        self.num_ejections += 1

    def _restore(self, now: float) -> None:
        self.status = "healthy"
        self.restored_at = now
        self.consecutive_successes = 0
        self.consecutive_failures = 0
        self.consecutive_probe_failures = 0

    # --- load -----------------------------------------------------------------

    def record_load(self, load: ReplicaLoad, started_at: float) -> None:
        """A load reading, requested at ``started_at``: what the gateway sent
        after that is not in it yet."""
        self.load = load
        self.load_error = None
        self.load_started_at = started_at
        self.tokens_since_load = sum(t.cost for t in self._tickets if t.started_at >= started_at)

    def load_tokens(self, now: float, stale_after_s: float) -> float:
        """Tokens of work on the replica: the backend's queued prompt plus
        active decode tokens and what was sent since the reading, or, with
        no fresh token figures, the gateway's own in-flight estimate."""
        load = self.load
        if (
            load is not None
            and load.queued_prompt_tokens is not None
            and load.active_decode_tokens is not None
            and now - self.load_started_at <= stale_after_s
        ):
            backend = load.queued_prompt_tokens + load.active_decode_tokens
            return float(backend + self.tokens_since_load)
        return float(self.in_flight_tokens)

    def begin(self, cost: int, now: float | None = None) -> Ticket:
        """A request of about ``cost`` tokens (prompt + max_tokens) is sent to it."""
        ticket = Ticket(self, max(0, cost), time.monotonic() if now is None else now)
        self._tickets.add(ticket)
        self.in_flight += 1
        self.in_flight_tokens += ticket.cost
        self.tokens_since_load += ticket.cost
        self.num_requests += 1
        return ticket

    def _end(self, ticket: Ticket) -> None:
        self._tickets.discard(ticket)
        self.in_flight -= 1
        self.in_flight_tokens -= ticket.cost
        if ticket.started_at >= self.load_started_at:
            self.tokens_since_load -= ticket.cost

    def view(self, replica: Replica, now: float) -> ReplicaView:
        """This replica (as the policy lists it) as a picker sees it."""
        stale = max(3 * self.config.load_interval_s, 2.0)
        return ReplicaView(replica, self.load_tokens(now, stale), self.in_flight)


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """A replica's state for ``GET /admin/backends`` and metrics."""

    url: str
    pool: str
    kind: str
    status: HealthStatus
    ejected_for_s: float
    consecutive_failures: int
    consecutive_probe_failures: int
    consecutive_successes: int
    in_flight: int
    in_flight_tokens: int
    load_tokens: float
    backend_load: ReplicaLoad | None
    load_error: str | None
    last_probe_ok: bool | None
    last_probe_detail: str | None
    last_probe_age_s: float | None
    last_error: str | None
    num_requests: int
    num_failures: int
    num_ejections: int


class ReplicaBook:
    """The ``ReplicaState`` of every replica in the policy, by URL.

    A URL listed by several pools is one replica (one server), configured
    by the first of those pools in name order.
    """

    def __init__(self, policy: Policy | None = None) -> None:
        self._states: dict[str, ReplicaState] = {}
        if policy is not None:
            self.configure(policy)

    def configure(self, policy: Policy) -> None:
        """Track ``policy``'s replicas: new ones start healthy, known ones keep
        their state with the new settings, dropped ones are forgotten (a
        request still holding one finishes normally)."""
        states: dict[str, ReplicaState] = {}
        for name in sorted(policy.pools):
            pool = policy.pools[name]
            deep_model = next(
                (m.upstream_model for m in policy.models.values() if m.pool.name == name), None
            )
            for replica in pool.replicas:
                if replica.url in states:
                    continue
                state = self._states.get(replica.url)
                if state is None:
                    state = ReplicaState(replica.url, name, pool.kind, pool.health)
                state.pool, state.kind, state.config = name, pool.kind, pool.health
                state.deep_probe_model = deep_model
                states[replica.url] = state
        self._states = states

    def get(self, url: str) -> ReplicaState | None:
        """The state of ``url``, or None when the policy has no such replica."""
        return self._states.get(url)

    def state(self, url: str, pool: Pool) -> ReplicaState:
        """The state of ``url``, created for a replica of a policy newer than
        the last ``configure`` (a request racing a reload)."""
        state = self._states.get(url)
        if state is None:
            state = self._states[url] = ReplicaState(url, pool.name, pool.kind, pool.health)
        return state

    def states(self) -> Iterable[ReplicaState]:
        """Every tracked replica."""
        return list(self._states.values())

    def views(
        self, pool: Pool, version: ModelVersion | None = None, now: float | None = None
    ) -> list[ReplicaView]:
        """The replicas of ``pool`` that may take a request now (healthy, not
        drained, serving ``version``), as pickers see them."""
        now = time.monotonic() if now is None else now
        serving = version.replicas if version is not None else None
        views = []
        for replica in pool.replicas:
            if replica.weight <= 0 or (serving is not None and replica.url not in serving):
                continue
            state = self.state(replica.url, pool)
            if state.routable(now):
                views.append(state.view(replica, now))
        return views

    def can_serve(self, pool: Pool, version: ModelVersion | None, now: float) -> bool:
        """Whether any replica of ``pool`` may take a request for ``version`` now."""
        serving = version.replicas if version is not None else None
        for replica in pool.replicas:
            if replica.weight <= 0 or (serving is not None and replica.url not in serving):
                continue
            if self.state(replica.url, pool).routable(now):
                return True
        return False

    def retry_after_s(self, pool: Pool, now: float | None = None) -> float:
        """Seconds until the first of ``pool``'s ejected replicas may return (at least 1)."""
        now = time.monotonic() if now is None else now
        waits = [
            self.state(r.url, pool).ejected_until - now
            for r in pool.replicas
            if r.weight > 0 and not self.state(r.url, pool).routable(now)
        ]
        return max(1.0, min(waits, default=1.0))

    def status(self, now: float | None = None) -> list[ReplicaStatus]:
        """Every replica's state, by pool and URL."""
        now = time.monotonic() if now is None else now
        out = []
        for state in sorted(self._states.values(), key=lambda s: (s.pool, s.url)):
            probe = state.last_probe
            ejected_for = 0.0 if state.routable(now) else max(0.0, state.ejected_until - now)
            out.append(
                ReplicaStatus(
                    url=state.url,
                    pool=state.pool,
                    kind=state.kind,
                    status=state.status,
                    ejected_for_s=round(ejected_for, 3),
                    consecutive_failures=state.consecutive_failures,
                    consecutive_probe_failures=state.consecutive_probe_failures,
                    consecutive_successes=state.consecutive_successes,
                    in_flight=state.in_flight,
                    in_flight_tokens=state.in_flight_tokens,
                    load_tokens=state.load_tokens(now, max(3 * state.config.load_interval_s, 2.0)),
                    backend_load=state.load,
                    load_error=state.load_error,
                    last_probe_ok=probe.ok if probe else None,
                    last_probe_detail=probe.detail if probe else None,
                    last_probe_age_s=round(now - probe.at, 3) if probe else None,
                    last_error=state.last_error,
                    num_requests=state.num_requests,
                    num_failures=state.num_failures,
                    num_ejections=state.num_ejections,
                )
            )
        return out


def report_success(state: ReplicaState, *, probe: bool = False) -> None:
    """``record_success`` now, logging a restoration."""
    was = state.status
    state.record_success(time.monotonic(), probe=probe)
    if was != state.status:
        log.info("replica_restored", replica=state.url, pool=state.pool)


def report_failure(state: ReplicaState, reason: str, *, probe: bool = False) -> None:
    """``record_failure`` now, logging an ejection."""
    was = state.status
    now = time.monotonic()
    state.record_failure(now, reason, probe=probe)
    if was != state.status:
        log.warning(
            "replica_ejected",
            replica=state.url,
            pool=state.pool,
            reason=reason,
            ejected_for_s=round(state.ejected_until - now, 3),
            ejections_in_row=state.ejections_in_row,
        )
