"""Metric families read at scrape time from state the gateway keeps anyway.

Replica health and load (``ReplicaBook``), queue depths and rejections
(``PoolQueues``), policy reloads (``PolicyWatcher``) and the quota store's
breaker already count what the metrics show, so nothing is added to the
request path for them. The scrape copies them into a ``StateSnapshot`` on
the event loop (those objects have no locks), and ``StateCollector`` turns
the snapshot into families wherever the text is rendered.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from gateway.policy.watcher import PolicyWatcher
from gateway.queueing.pool import PoolStats
from gateway.queueing.registry import PoolQueues
from gateway.quota.breaker import GuardedStore
from gateway.quota.store import QuotaStore
from gateway.upstream.health import ReplicaBook, ReplicaStatus


@dataclass(frozen=True, slots=True)
class StateSnapshot:
    """What the scrape-time families show, copied on the event loop."""

    replicas: Sequence[ReplicaStatus]
    queues: Sequence[PoolStats]
    reloads_ok: int
    reloads_failed: int
    last_reload_ok: bool
    last_reload_at: float | None
    store_up: bool
    breaker_trips: int


def take_snapshot(
    book: ReplicaBook,
    queues: PoolQueues,
    watcher: PolicyWatcher,
    store: QuotaStore,
    *,
    store_up: bool,
) -> StateSnapshot:
    """Copy the live state (call on the event loop)."""
    return StateSnapshot(
        replicas=book.status(),
        queues=queues.stats(),
        reloads_ok=watcher.reloads_ok,
        reloads_failed=watcher.reloads_failed,
        last_reload_ok=watcher.last_error is None,
        last_reload_at=watcher.last_reload_at,
        store_up=store_up,
        breaker_trips=store.breaker.trips if isinstance(store, GuardedStore) else 0,
    )


class StateCollector:
    """The families of one ``StateSnapshot`` (a prometheus_client collector)."""

    def __init__(self, snapshot: StateSnapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        """Replica, queue, policy and quota store families."""
        yield from _replica_families(self._snapshot.replicas)
        yield from _queue_families(self._snapshot.queues)
        yield from _policy_families(self._snapshot)
        yield from _store_families(self._snapshot)


def _replica_families(statuses: Sequence[ReplicaStatus]) -> Iterator[Metric]:
    labels = ("pool", "replica")
    healthy = GaugeMetricFamily(
        "tollgate_replica_healthy",
        "1 when the replica takes requests, 0 when ejected",
        labels=labels,
    )
    in_flight = GaugeMetricFamily(
        "tollgate_replica_in_flight",
        "requests this gateway has in flight on the replica",
        labels=labels,
    )
    load = GaugeMetricFamily(
        "tollgate_replica_load_tokens", "tokens queued and decoding (best estimate)", labels=labels
    )
    requests = CounterMetricFamily(
        "tollgate_replica_requests", "requests sent to the replica", labels=labels
    )
    failures = CounterMetricFamily(
        "tollgate_replica_failures", "failed requests and probes", labels=labels
    )
    ejections = CounterMetricFamily(
        "tollgate_replica_ejections", "times the replica was ejected", labels=labels
    )
    for s in statuses:
        values = (s.pool, s.url)
        healthy.add_metric(values, 1.0 if s.ejected_for_s == 0 else 0.0)
        in_flight.add_metric(values, s.in_flight)
        load.add_metric(values, s.load_tokens)
        requests.add_metric(values, s.num_requests)
        failures.add_metric(values, s.num_failures)
        ejections.add_metric(values, s.num_ejections)
    yield from (healthy, in_flight, load, requests, failures, ejections)


def _queue_families(pools: Sequence[PoolStats]) -> Iterator[Metric]:
    depth = GaugeMetricFamily(
        "tollgate_queue_depth",
        "requests waiting in the pool's queue, by priority class",
        labels=("pool", "priority"),
    )
    rejections = CounterMetricFamily(
        "tollgate_queue_rejections",
        "requests the queue refused with a 503: queue_full (on arrival or pushed "
        "out) or queue_timeout (waited past max_queue_wait_s)",
        labels=("pool", "priority", "reason"),
    )
    for pool in pools:
        for name, stats in sorted(pool.classes.items()):
            depth.add_metric((pool.pool, name), stats.num_queued)
            rejections.add_metric((pool.pool, name, "queue_full"), stats.num_rejected_full)
            rejections.add_metric((pool.pool, name, "queue_timeout"), stats.num_timed_out)
    yield from (depth, rejections)


def _policy_families(snapshot: StateSnapshot) -> Iterator[Metric]:
    reloads = CounterMetricFamily(
        "tollgate_policy_reloads",
        "policy reloads after start-up: ok (in force) or error (rejected, last good kept)",
        labels=("result",),
    )
    reloads.add_metric(("ok",), snapshot.reloads_ok)
    reloads.add_metric(("error",), snapshot.reloads_failed)
    yield reloads
    yield GaugeMetricFamily(
        "tollgate_policy_last_reload_success",
        "1 when the last load or reload of the policy files succeeded, else 0",
        value=1.0 if snapshot.last_reload_ok else 0.0,
    )
    if snapshot.last_reload_at is not None:
        yield GaugeMetricFamily(
            "tollgate_policy_last_reload_timestamp_seconds",
            "Unix time the last load or reload finished, whatever its outcome",
            value=snapshot.last_reload_at,
        )


def _store_families(snapshot: StateSnapshot) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "tollgate_quota_store_up",
        "1 when the quota store answers (and its breaker is not open), else 0",
        value=1.0 if snapshot.store_up else 0.0,
    )
    yield CounterMetricFamily(
        "tollgate_quota_store_breaker_trips",
        "times the quota store's circuit breaker opened",
        value=snapshot.breaker_trips,
    )
