"""OpenTelemetry tracing over real HTTP, into the SDK's in-memory exporter:
one server span per request, continuing the client's trace, with the
children auth, route, quota, queue and upstream; every span names the
request id and the tenant, and none carries prompt text."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode

from gateway.observe.tracing import tracing_with_exporter
from gateway.settings import GatewaySettings
from tests.conftest import gateway_env
from tests.integration.test_quota_http import point_at
from tests.support.processes import FakeUpstreamProcess, InProcessGateway

SECRET_PROMPT = "the launch codes are 0000"
CHILDREN = ["auth", "route", "quota", "queue", "upstream"]
CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"


@pytest.fixture
def traced(
    fake_upstream: FakeUpstreamProcess,
    policy_dirs: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[InProcessGateway, InMemorySpanExporter]]:
    tenants, policies = policy_dirs
    point_at(policies, fake_upstream.url)
    env = gateway_env(fake_upstream.url, tenants, policies)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    exporter = InMemorySpanExporter()
    gw = InProcessGateway(
        GatewaySettings.from_env(env), tracing=tracing_with_exporter(exporter, batch=False)
    )
    gw.start()
    try:
        yield gw, exporter
    finally:
        gw.stop()


def post(gw: InProcessGateway, token: str, request_id: str, **body: Any) -> httpx.Response:
    headers = {
        "authorization": f"Bearer {token}",
        "x-request-id": request_id,
        "traceparent": f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01",
    }
    payload = {"model": "smollm2", "messages": [{"role": "user", "content": SECRET_PROMPT}]}
    return httpx.post(
        f"{gw.url}/v1/chat/completions",
        headers=headers,
        json={**payload, "max_tokens": 8, **body},
        timeout=30,
    )


def of_request(spans: Sequence[ReadableSpan], request_id: str) -> list[ReadableSpan]:
    return [s for s in spans if (s.attributes or {}).get("tollgate.request_id") == request_id]


def server_and_children(
    spans: Sequence[ReadableSpan],
) -> tuple[ReadableSpan, dict[str, ReadableSpan]]:
    servers = [s for s in spans if s.kind == SpanKind.SERVER]
    assert len(servers) == 1
    server = servers[0]
    children = {s.name: s for s in spans if s is not server}
    assert len(children) == len(spans) - 1  # one span per step
    return server, children


@pytest.mark.parametrize("stream", [False, True])
def test_one_server_span_with_a_child_per_step(
    traced: tuple[InProcessGateway, InMemorySpanExporter],
    fake_upstream: FakeUpstreamProcess,
    mint: Callable[..., str],
    stream: bool,
) -> None:
    gw, exporter = traced
    request_id = f"trace-{'stream' if stream else 'plain'}"
    response = post(gw, mint("acme"), request_id, stream=stream)
    assert response.status_code == 200, response.text
    spans = of_request(exporter.get_finished_spans(), request_id)
    server, children = server_and_children(spans)

    assert server.name == "POST /v1/chat/completions"
    assert server.context is not None and server.parent is not None
    # It continues the client's trace.
    assert format(server.context.trace_id, "032x") == CLIENT_TRACE_ID
    assert format(server.parent.span_id, "016x") == CLIENT_SPAN_ID
    assert (server.attributes or {})["http.response.status_code"] == 200
    assert (server.attributes or {})["tollgate.model"] == "smollm2"
    assert sorted(children) == sorted(CHILDREN)
    for child in children.values():
        assert child.parent is not None and child.context is not None
        assert child.parent.span_id == server.context.span_id
        assert child.context.trace_id == server.context.trace_id
        assert child.status.status_code != StatusCode.ERROR
    assert children["upstream"].kind == SpanKind.CLIENT
    assert (children["upstream"].attributes or {})["tollgate.replica"] == fake_upstream.url
    # The steps happen in order, inside the request.
    starts = [children[name].start_time or 0 for name in CHILDREN]
    assert starts == sorted(starts)
    assert (server.start_time or 0) <= starts[0]
    assert (children["upstream"].end_time or 0) <= (server.end_time or 0)
    for span in spans:
        attributes = dict(span.attributes or {})
        assert attributes["tollgate.request_id"] == request_id
        assert attributes["tollgate.tenant"] == "acme"
        assert not any(SECRET_PROMPT in str(value) for value in attributes.values())


def test_a_refused_request_ends_its_open_step_in_error(
    traced: tuple[InProcessGateway, InMemorySpanExporter],
) -> None:
    gw, exporter = traced
    response = post(gw, "not-a-token", "trace-refused")
    assert response.status_code == 401
    server, children = server_and_children(
        of_request(exporter.get_finished_spans(), "trace-refused")
    )
    assert list(children) == ["auth"]
    assert children["auth"].status.status_code == StatusCode.ERROR
    assert (server.attributes or {})["http.response.status_code"] == 401
    assert (server.attributes or {})["tollgate.tenant"] == "unknown"
    # A 4xx is the client's error, not the server's.
    assert server.status.status_code != StatusCode.ERROR


def test_an_upstream_failure_marks_the_server_span(
    traced: tuple[InProcessGateway, InMemorySpanExporter],
    mint: Callable[..., str],
) -> None:
    gw, exporter = traced
    response = post(gw, mint("acme"), "trace-502", x_fake={"status": 500})
    assert response.status_code == 502
    server, children = server_and_children(of_request(exporter.get_finished_spans(), "trace-502"))
    assert server.status.status_code == StatusCode.ERROR
    assert children["upstream"].status.status_code == StatusCode.ERROR
