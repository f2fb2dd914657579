"""Prometheus metrics under the names existing LLM routers read.

The Gateway API Inference Extension and llm-d scrape vLLM's names, so the
backend uses them: `vllm:num_requests_running`, `vllm:num_requests_waiting`,
`vllm:kv_cache_usage_perc`, prefix-cache counters, latency histograms. Gauges
are read from the scheduler's last stats at scrape time, so they cost nothing
per step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from backend.engine.request import Request
from backend.scheduler.stats import SchedulerStats

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)


class _StatsCollector(Collector):
    """Exposes the scheduler's snapshot as gauges and counters."""

    def __init__(self, model_name: str, stats: Callable[[], SchedulerStats]):
        self._model = model_name
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        s = self._stats()
        labels = ["model_name"]
        values = [self._model]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, value)
            return c

        yield gauge("vllm:num_requests_running", "Requests holding KV blocks.", s.num_running)
        yield gauge("vllm:num_requests_waiting", "Requests waiting for admission.", s.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).", s.kv_usage)
        yield gauge(
            "tollgate:queued_prompt_tokens",
            "Prompt tokens not yet computed.",
            s.queued_prompt_tokens,
        )
        yield gauge(
            "tollgate:active_decode_tokens",
            "Tokens still to generate for running requests.",
            s.active_decode_tokens,
        )
        yield counter(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            s.prefix_cache_queries,
        )
        yield counter(
            "vllm:prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
            s.prefix_cache_hits,
        )
        yield counter(
            "vllm:num_preemptions", "Requests preempted for KV space.", s.num_preemptions_total
        )


class EngineMetrics:
    """The backend's metric registry; one per server instance."""

    def __init__(self, model_name: str, stats: Callable[[], SchedulerStats]):
        self.registry = CollectorRegistry()
        self.registry.register(_StatsCollector(model_name, stats))
        labels = ["model_name"]
        self._model = model_name

        def hist(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, labels, registry=self.registry, buckets=_LATENCY_BUCKETS)

        self._ttft = hist("vllm:time_to_first_token_seconds", "Time to first token.")
        self._itl = hist("vllm:inter_token_latency_seconds", "Time between output tokens.")
        self._e2e = hist("vllm:e2e_request_latency_seconds", "Request latency, end to end.")
        self._queue = hist("vllm:request_queue_time_seconds", "Time waiting before first schedule.")
        self._prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prompt tokens processed.", labels, registry=self.registry
        )
        self._generation_tokens = Counter(
            "vllm:generation_tokens", "Tokens generated.", labels, registry=self.registry
        )
        self._finished = Counter(
            "vllm:request_success",
            "Finished requests by reason.",
            [*labels, "finished_reason"],
            registry=self.registry,
        )

    def observe_first_token(self, seconds: float) -> None:
        """Record a time to first token."""
        self._ttft.labels(self._model).observe(seconds)

    def observe_inter_token(self, seconds: float, num_tokens: int) -> None:
        """Record the gap before `num_tokens` tokens that arrived together."""
        per = seconds / max(num_tokens, 1)
        h = self._itl.labels(self._model)
        for _ in range(num_tokens):
            h.observe(per)

    def observe_finished(
        self,
        request: Request,
        prompt_tokens: int,
        completion_tokens: int,
        seconds: float,
        finish_reason: str | None,
    ) -> None:
        """Record a request that left the engine, however it ended."""
        self._e2e.labels(self._model).observe(seconds)
        if request.first_scheduled_time is not None:
            self._queue.labels(self._model).observe(
                max(0.0, request.first_scheduled_time - request.arrival_time)
            )
        self._prompt_tokens.labels(self._model).inc(prompt_tokens)
        self._generation_tokens.labels(self._model).inc(completion_tokens)
        self._finished.labels(self._model, finish_reason or "abort").inc()

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
