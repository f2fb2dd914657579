"""What recording one request's metrics (and its trace, when off) costs.

    python bench/metrics_cost.py

Replays, with ``timeit``, the exact calls the request path makes for one
successful non-streamed request (``gateway/api/openai.py``): the
``RequestObserver`` steps plus the do-nothing trace's ``child``/``end``/
``set``/``inject`` calls. For comparison it times the same updates on
prometheus_client's own metric objects, with children looked up once and
with ``labels(tenant=..., model=...)`` on every update, and the copy and
render of a scrape with many series. Figures go into docs/metrics.md.
"""

from __future__ import annotations

import statistics
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram  # noqa: E402

from gateway.api.sse import StreamUsage  # noqa: E402
from gateway.observe.metrics import (  # noqa: E402
    DURATION_BUCKETS,
    OVERHEAD_BUCKETS,
    QUEUE_WAIT_BUCKETS,
    TTFT_BUCKETS,
    GatewayMetrics,
    render,
)
from gateway.observe.request import RequestObserver  # noqa: E402
from gateway.observe.state import StateSnapshot  # noqa: E402
from gateway.observe.tracing import NO_TRACING  # noqa: E402
from gateway.policy.loader import load_policy  # noqa: E402

POLICY = load_policy(REPO / "tenants", REPO / "policies", environ={})
USAGE = StreamUsage(prompt_tokens=120, completion_tokens=40, seen=True)
HEADERS: dict[str, str] = {}
EMPTY = StateSnapshot((), (), 0, 0, True, None, True, 0)


def one_request(metrics: GatewayMetrics) -> None:
    """The metric and trace calls of one successful non-streamed request."""
    trace = NO_TRACING.request("rid", "POST", "/v1/chat/completions", HEADERS)
    obs = RequestObserver(metrics, trace, 0.0)
    span = trace.child("auth")
    obs.identify("acme")
    span.end()
    obs.model(POLICY, "smollm2")
    span = trace.child("route")
    span.end()
    trace.set("tollgate.model", "smollm2")
    span = trace.child("quota")
    span.end()
    span = trace.child("queue")
    span.end()
    obs.queued("local", "standard", 0.0)
    upstream = trace.child("upstream", client=True)
    trace.inject(HEADERS, upstream)
    obs.sent(0.0006)
    upstream.set("tollgate.replica", "http://127.0.0.1:8081")
    obs.first_byte()
    obs.usage(USAGE)
    upstream.end()
    obs.finish(200)


def trace_calls_only() -> None:
    """The do-nothing trace's share of ``one_request``."""
    trace = NO_TRACING.request("rid", "POST", "/v1/chat/completions", HEADERS)
    for name in ("auth", "route", "quota", "queue"):
        trace.child(name).end()
    trace.set("tollgate.model", "smollm2")
    upstream = trace.child("upstream", client=True)
    trace.inject(HEADERS, upstream)
    upstream.set("tollgate.replica", "http://127.0.0.1:8081")
    upstream.end()
    trace.end(200)


class ClientLibrary:
    """The same families as prometheus_client's own metric objects."""

    def __init__(self) -> None:
        r = CollectorRegistry()
        both = ("tenant", "model")
        self.requests = Counter("r_total", "r", (*both, "status"), registry=r)
        self.duration = Histogram("d", "d", both, buckets=DURATION_BUCKETS, registry=r)
        self.ttft = Histogram("t", "t", both, buckets=TTFT_BUCKETS, registry=r)
        self.queue = Histogram(
            "q", "q", ("pool", "priority"), buckets=QUEUE_WAIT_BUCKETS, registry=r
        )
        self.overhead = Histogram("o", "o", ("model",), buckets=OVERHEAD_BUCKETS, registry=r)
        self.tokens = Counter("k_total", "k", (*both, "kind"), registry=r)
        self.in_flight = Gauge("f", "f", ("model",), registry=r)


def naive_request(lib: ClientLibrary) -> None:
    """One request's updates with a keyword ``labels()`` lookup each time."""
    labels = {"tenant": "acme", "model": "smollm2"}
    lib.in_flight.labels(model="smollm2").inc()
    lib.queue.labels(pool="local", priority="standard").observe(0.0)
    lib.overhead.labels(model="smollm2").observe(0.0006)
    lib.ttft.labels(**labels).observe(0.02)
    lib.tokens.labels(kind="prompt", **labels).inc(120)
    lib.tokens.labels(kind="completion", **labels).inc(40)
    lib.tokens.labels(kind="cached", **labels).inc(0)
    lib.in_flight.labels(model="smollm2").dec()
    lib.requests.labels(status="200", **labels).inc()
    lib.duration.labels(**labels).observe(0.03)


def cached_children(lib: ClientLibrary) -> Callable[[], None]:
    """One request's updates on prometheus_client children looked up once."""
    both = ("acme", "smollm2")
    in_flight = lib.in_flight.labels("smollm2")
    queue = lib.queue.labels("local", "standard")
    overhead = lib.overhead.labels("smollm2")
    ttft, duration = lib.ttft.labels(*both), lib.duration.labels(*both)
    prompt, completion = lib.tokens.labels(*both, "prompt"), lib.tokens.labels(*both, "completion")
    cached, requests = lib.tokens.labels(*both, "cached"), lib.requests.labels(*both, "200")

    def request() -> None:
        in_flight.inc()
        queue.observe(0.0)
        overhead.observe(0.0006)
        ttft.observe(0.02)
        prompt.inc(120)
        completion.inc(40)
        cached.inc(0)
        in_flight.dec()
        requests.inc()
        duration.observe(0.03)

    return request


def per_call_us(fn: object, number: int = 20_000, repeat: int = 7) -> tuple[float, float]:
    """Median and best microseconds per call over ``repeat`` runs."""
    runs = timeit.repeat(fn, number=number, repeat=repeat)  # type: ignore[arg-type]
    per = [r / number * 1e6 for r in runs]
    return statistics.median(per), min(per)


def render_ms(num_tenants: int, num_models: int) -> tuple[float, float]:
    """Milliseconds to copy (on the loop) and render (in a thread) a scrape
    with every (tenant, model) pair used."""
    metrics = GatewayMetrics()
    for t in range(num_tenants):
        for m in range(num_models):
            series = metrics.series(f"tenant-{t}", f"model-{m}")
            series.statuses[200] = 1
            series.duration.observe(0.5)
            series.ttft.observe(0.1)
            series.prompt_tokens += 10
            series.per_model.overhead.observe(0.0005)
    freeze = min(timeit.repeat(metrics.freeze, number=5, repeat=3)) / 5 * 1000
    frozen = metrics.freeze()
    text = min(timeit.repeat(lambda: render(frozen, EMPTY), number=5, repeat=3)) / 5 * 1000
    return freeze, text


def main() -> None:
    """Print the table docs/metrics.md quotes."""
    metrics = GatewayMetrics()
    one_request(metrics)  # series made, as after a process's first request
    lib = ClientLibrary()
    cases = {
        "Tollgate: metrics + tracing off": lambda: one_request(metrics),
        "  of which: the tracing-off calls": trace_calls_only,
        "prometheus_client, cached children": cached_children(lib),
        "prometheus_client, labels(**kwargs)": lambda: naive_request(lib),
    }
    print(f"python {sys.version.split()[0]}")
    for name, fn in cases.items():
        median, best = per_call_us(fn)
        print(f"{name:<40} median {median:6.2f} us   best {best:6.2f} us")
    for tenants, models in ((10, 3), (100, 5)):
        freeze, text = render_ms(tenants, models)
        label = f"scrape, {tenants} tenants x {models} models"
        print(f"{label:<40} copy {freeze:6.2f} ms   render {text:6.1f} ms")


if __name__ == "__main__":
    main()
