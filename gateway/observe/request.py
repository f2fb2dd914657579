"""One inference request as metrics and a trace see it.

The handler makes a ``RequestObserver`` on entry and tells it what it learns
(the tenant, the model asked for, the queue wait, the overhead, the first
byte, the reported usage); ``finish`` records the outcome exactly once,
whichever way the request ends: a response, an error (any status, raised
anywhere in the handler), or a stream that ends, breaks, or whose client
leaves. A stream records itself when its generator finishes; the response's
after-send hook covers a stream whose generator never ran (its client left
before the first byte).

Until the tenant is known the request counts as tenant ``unknown``; until
the model is known, as model ``other`` (``gateway.observe.labels``).
"""

from __future__ import annotations

import time

from gateway.observe.labels import OTHER_MODEL, UNKNOWN_TENANT, model_label
from gateway.observe.metrics import GatewayMetrics, RequestSeries
from gateway.observe.tracing import RequestTrace
from gateway.policy.compiled import Policy
from gateway.usage.record import ReportedUsage


class RequestObserver:
    """Metrics and trace of one inference request; ``finish`` it once."""

    __slots__ = (
        "_done",
        "_first",
        "_in_flight",
        "_metrics",
        "_series",
        "_started",
        "_tenant",
        "trace",
    )

    def __init__(self, metrics: GatewayMetrics, trace: RequestTrace, started: float) -> None:
        self._metrics = metrics
        self.trace = trace
        """The request's spans (a do-nothing trace when tracing is off)."""
        self._started = started
        self._tenant = UNKNOWN_TENANT
        self._series: RequestSeries | None = None
        self._in_flight = False
        self._first = False
        self._done = False

    def _current(self) -> RequestSeries:
        series = self._series
        if series is None:
            series = self._series = self._metrics.series(self._tenant, OTHER_MODEL)
        return series

    def identify(self, tenant_id: str) -> None:
        """The caller's tenant is resolved (a policy tenant: a bounded label)."""
        self._tenant = tenant_id
        self.trace.tenant(tenant_id)

    def model(self, policy: Policy, requested: str) -> None:
        """The model asked for is known: the labels are fixed, and the request
        counts as in flight until it finishes."""
        label = model_label(policy, requested)
        series = self._series = self._metrics.series(self._tenant, label)
        series.per_model.in_flight += 1
        self._in_flight = True

    def queued(self, pool: str, priority: str, wait_s: float) -> None:
        """A slot of ``pool`` was granted after ``wait_s`` in the queue."""
        self._metrics.queue_waited(pool, priority, wait_s)

    def sent(self, overhead_s: float) -> None:
        """The request goes upstream after ``overhead_s`` of the gateway's own time."""
        self._current().per_model.overhead.observe(overhead_s)

    def first_byte(self) -> None:
        """The first bytes of the answer go to the client (later calls do nothing)."""
        if not self._first:
            self._first = True
            self._current().ttft.observe(time.perf_counter() - self._started)

    def usage(self, usage: ReportedUsage) -> None:
        """The backend's reported usage (nothing when it reported none)."""
        if usage.seen:
            series = self._current()
            series.prompt_tokens += usage.prompt_tokens
            series.completion_tokens += usage.completion_tokens
            series.cached_tokens += usage.cached_tokens

    def finish(self, status: int) -> None:
        """The request ended with HTTP ``status``; later calls do nothing."""
        if self._done:
            return
        self._done = True
        series = self._current()
        if self._in_flight:
            series.per_model.in_flight -= 1
        statuses = series.statuses
        statuses[status] = statuses.get(status, 0) + 1
        series.duration.observe(time.perf_counter() - self._started)
        self.trace.end(status)

    async def after_stream(self) -> None:
        """A stream's after-send hook: ``finish(200)`` unless the stream's own
        end already did (its headers went out with 200)."""
        self.finish(200)
