"""The Prometheus metrics of one gateway process.

The request path is latency-critical, so a request's metrics are plain
numbers updated on the event loop, with no lock and no label lookup:
``series(tenant, model)`` returns the (cached) ``RequestSeries`` of one
label pair, and a request adds to its integers and observes into its
histograms (a ``bisect`` and two additions each). prometheus_client's own
metric objects take a lock on every update, which costs over twice as much
per request for nothing here: every update happens on the one event loop
thread. A scrape copies the numbers on the loop (``GatewayMetrics.freeze``)
and renders the copy in a worker thread (``gateway.observe.exposition``).

Each ``GatewayMetrics`` holds its own numbers (no global registry), so
several gateways in one process, as in tests, never share a series.

State that already lives elsewhere (replica health, queue depths and
rejections, policy reloads, the quota store) is read at scrape time
instead (``gateway.observe.state``). docs/metrics.md lists every metric
and the measured cost per request.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import generate_latest

from gateway.observe.exposition import Counts, HistogramCopy, TextWriter
from gateway.observe.state import StateCollector, StateSnapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The classic text exposition format, which every Prometheus version reads."""

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
"""End to end, from a few tokens to the longest upstream deadline (600 s)."""
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 30, 60, 120)
"""Time to first token: interactive targets sit in 0.1-2 s; a long prompt or
a queued request takes much longer."""
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600)
"""Up to the longest shipped ``max_queue_wait_s`` (600 s, batch); requests
that took a free slot at once land in the first bucket (0)."""
OVERHEAD_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.005,
    0.01,
    0.025,
    0.05,
)
"""The gateway's own time before the request goes upstream: the budget is
under 1 ms, so the resolution is finest below it."""


class Histogram:
    """Counts per bucket and a sum, updated on the event loop only."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        """Upper bounds (inclusive), ascending; +Inf is implied."""
        self.counts = [0] * (len(bounds) + 1)
        """Observations per bucket, not cumulative; the last one is +Inf."""
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Count ``value`` in the first bucket whose bound is >= it."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


class ModelSeries:
    """What requests for one model share across tenants."""

    __slots__ = ("in_flight", "overhead")

    def __init__(self) -> None:
        self.in_flight = 0
        self.overhead = Histogram(OVERHEAD_BUCKETS)


class RequestSeries:
    """The numbers requests of one (tenant, model) pair update."""

    __slots__ = (
        "cached_tokens",
        "completion_tokens",
        "duration",
        "model",
        "per_model",
        "prompt_tokens",
        "statuses",
        "tenant",
        "ttft",
    )

    def __init__(self, tenant: str, model: str, per_model: ModelSeries) -> None:
        self.tenant = tenant
        self.model = model
        self.per_model = per_model
        self.statuses: dict[int, int] = {}
        """Finished requests by HTTP status."""
        self.duration = Histogram(DURATION_BUCKETS)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """The request metrics copied at one instant, safe to render anywhere."""

    requests: Counts
    duration: Sequence[HistogramCopy]
    ttft: Sequence[HistogramCopy]
    queue_wait: Sequence[HistogramCopy]
    overhead: Sequence[HistogramCopy]
    tokens: Counts
    quota_denials: Counts
    upstream_errors: Counts
    in_flight: Counts

    def write(self, out: TextWriter) -> None:
        """Append every request family to ``out``."""
        tenant_model = ("tenant", "model")
        out.counter(
            "tollgate_requests_total",
            "Inference requests by final HTTP status (a stream counts when it ends).",
            ("tenant", "model", "status"),
            self.requests,
        )
        out.histogram(
            "tollgate_request_duration_seconds",
            "Inference requests end to end, errors included.",
            tenant_model,
            self.duration,
        )
        out.histogram(
            "tollgate_time_to_first_token_seconds",
            "From the request's arrival to the first byte of the answer sent to the client.",
            tenant_model,
            self.ttft,
        )
        out.histogram(
            "tollgate_queue_wait_seconds",
            "Time in the pool's priority queue of requests that got a slot (0: not queued).",
            ("pool", "priority"),
            self.queue_wait,
        )
        out.histogram(
            "tollgate_gateway_overhead_seconds",
            "The gateway's own time before sending upstream, queue wait excluded "
            "(the x-tollgate-overhead-ms header).",
            ("model",),
            self.overhead,
        )
        out.counter(
            "tollgate_tokens_total",
            "Tokens the backends reported; cached is part of prompt.",
            ("tenant", "model", "kind"),
            self.tokens,
        )
        out.counter(
            "tollgate_quota_denials_total",
            "Requests refused by a quota, by the limit that refused them.",
            ("tenant", "reason"),
            self.quota_denials,
        )
        out.counter(
            "tollgate_upstream_errors_total",
            "Failed attempts to a backend replica (a retried request may count several).",
            ("pool", "kind"),
            self.upstream_errors,
        )
        out.gauge(
            "tollgate_in_flight_requests",
            "Inference requests this process is handling, streams until they end.",
            ("model",),
            self.in_flight,
        )


def _copy(labels: tuple[str, ...], h: Histogram) -> HistogramCopy:
    return HistogramCopy(labels, h.bounds, tuple(h.counts), h.total)


class GatewayMetrics:
    """The request metrics of one gateway process (see the module docstring).

    Update it on the event loop only; ``freeze`` there too, then render the
    snapshot anywhere.
    """

    def __init__(self) -> None:
        self._series: dict[tuple[str, str], RequestSeries] = {}
        self._models: dict[str, ModelSeries] = {}
        self._queue_wait: dict[tuple[str, str], Histogram] = {}
        self._denials: dict[tuple[str, str], int] = {}
        self._upstream_errors: dict[tuple[str, str], int] = {}

    def series(self, tenant: str, model: str) -> RequestSeries:
        """The numbers of (``tenant``, ``model``): pass bounded label values
        only (``gateway.observe.labels``)."""
        found = self._series.get((tenant, model))
        if found is None:
            per_model = self._models.get(model)
            if per_model is None:
                per_model = self._models[model] = ModelSeries()
            found = self._series[(tenant, model)] = RequestSeries(tenant, model, per_model)
        return found

    def queue_waited(self, pool: str, priority: str, wait_s: float) -> None:
        """A request of class ``priority`` got a slot of ``pool`` after ``wait_s``."""
        histogram = self._queue_wait.get((pool, priority))
        if histogram is None:
            histogram = self._queue_wait[(pool, priority)] = Histogram(QUEUE_WAIT_BUCKETS)
        histogram.observe(wait_s)

    def quota_denied(self, tenant: str, reason: str) -> None:
        """A quota refused a request of ``tenant`` (``Quota.on_denial`` hook)."""
        key = (tenant, reason)
        self._denials[key] = self._denials.get(key, 0) + 1

    def upstream_error(self, pool: str, kind: str) -> None:
        """An attempt to a replica of ``pool`` failed (``UpstreamClient`` hook)."""
        key = (pool, kind)
        self._upstream_errors[key] = self._upstream_errors.get(key, 0) + 1

    def freeze(self) -> MetricsSnapshot:
        """Copy every number (on the event loop: nothing else changes them)."""
        series = list(self._series.values())
        tokens: list[tuple[tuple[str, ...], int]] = []
        for s in series:
            tokens.append(((s.tenant, s.model, "prompt"), s.prompt_tokens))
            tokens.append(((s.tenant, s.model, "completion"), s.completion_tokens))
            tokens.append(((s.tenant, s.model, "cached"), s.cached_tokens))
        return MetricsSnapshot(
            requests=[
                ((s.tenant, s.model, str(code)), count)
                for s in series
                for code, count in sorted(s.statuses.items())
            ],
            duration=[_copy((s.tenant, s.model), s.duration) for s in series],
            ttft=[_copy((s.tenant, s.model), s.ttft) for s in series],
            queue_wait=[_copy(key, h) for key, h in self._queue_wait.items()],
            overhead=[_copy((model,), m.overhead) for model, m in self._models.items()],
            tokens=tokens,
            quota_denials=list(self._denials.items()),
            upstream_errors=list(self._upstream_errors.items()),
            in_flight=[((model,), m.in_flight) for model, m in self._models.items()],
        )


def render(metrics: MetricsSnapshot, state: StateSnapshot) -> bytes:
    """The exposition text of both snapshots (no live object is read, so
    this may run off the event loop): the request families, then the
    scrape-time state through prometheus_client."""
    out = TextWriter()
    metrics.write(out)
    return out.text().encode() + generate_latest(StateCollector(state))
