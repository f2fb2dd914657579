"""Tracing off costs no import; on, spans propagate through traceparent."""

from __future__ import annotations

import subprocess
import sys

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.observe.tracing import NO_TRACING, build_tracing, tracing_with_exporter
from gateway.settings import otel_endpoint_from
from tests.support.processes import REPO


def test_off_means_the_shared_do_nothing_trace() -> None:
    assert build_tracing(None) is NO_TRACING
    assert not NO_TRACING.enabled
    trace = NO_TRACING.request("r", "POST", "/v1/completions", {})
    assert NO_TRACING.request("s", "POST", "/v1/completions", {}) is trace
    span = trace.child("auth")
    span.set("k", 1)
    span.end()
    headers: dict[str, str] = {}
    trace.inject(headers, span)
    trace.end(200)
    assert headers == {}


def test_the_gateway_runs_without_opentelemetry_installed() -> None:
    # A None entry in sys.modules makes every import of the package fail.
    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "from gateway.app import create_app\n"
        "from gateway.observe.tracing import NO_TRACING, build_tracing\n"
        "from gateway.settings import GatewaySettings\n"
        "create_app(GatewaySettings())\n"
        "assert build_tracing(None) is NO_TRACING\n"
        "assert build_tracing('http://127.0.0.1:4318/v1/traces') is NO_TRACING\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


def test_the_upstream_request_carries_the_upstream_spans_traceparent() -> None:
    exporter = InMemorySpanExporter()
    tracing = tracing_with_exporter(exporter, batch=False)
    trace = tracing.request("r1", "POST", "/v1/chat/completions", {})
    upstream = trace.child("upstream", client=True)
    headers: dict[str, str] = {}
    trace.inject(headers, upstream)
    upstream.end()
    trace.end(200)
    tracing.shutdown()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    context = spans["upstream"].context
    assert context is not None
    version, trace_id, span_id, _ = headers["traceparent"].split("-")
    assert version == "00"
    assert trace_id == format(context.trace_id, "032x")
    assert span_id == format(context.span_id, "016x")


def test_the_endpoint_comes_from_ours_or_the_standard_variables() -> None:
    assert otel_endpoint_from({}) is None
    ours = {"TOLLGATE_OTEL_ENDPOINT": "http://c:4318/v1/traces"}
    assert otel_endpoint_from(ours) == "http://c:4318/v1/traces"
    traces = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4318/v1/traces"}
    assert otel_endpoint_from(traces) == "http://t:4318/v1/traces"
    base = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://b:4318/"}
    assert otel_endpoint_from(base) == "http://b:4318/v1/traces"
    assert otel_endpoint_from({**ours, "OTEL_SDK_DISABLED": "true"}) is None
    assert otel_endpoint_from({**base, "OTEL_TRACES_EXPORTER": "none"}) is None
