"""Optional OpenTelemetry tracing of inference requests.

Off unless an OTLP endpoint is configured (``GatewaySettings.otel_endpoint``:
``TOLLGATE_OTEL_ENDPOINT``, else the standard ``OTEL_EXPORTER_OTLP_*``
variables). When off, ``NO_TRACING`` hands every request the same do-nothing
trace: opentelemetry is never imported and a request pays a few empty
method calls. When on (``pip install 'tollgate[tracing]'``), each request
gets one server span, continuing the client's ``traceparent`` when it sent
one, with children ``auth``, ``route``, ``quota``, ``queue`` and
``upstream``; the upstream request carries the ``traceparent`` of its span,
so a backend that traces joins the same trace. Every span carries
``tollgate.request_id`` and ``tollgate.tenant``; no span carries prompt or
completion text. Spans are exported in batches from a background thread.

opentelemetry is imported here only, inside the functions that build a
real tracer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol

import structlog

from gateway.observe.labels import UNKNOWN_TENANT

log = structlog.get_logger("tollgate.tracing")

AttributeValue = str | int | float | bool
REQUEST_ID = "tollgate.request_id"
TENANT = "tollgate.tenant"
DEFAULT_SERVICE_NAME = "tollgate-gateway"


class Span(Protocol):
    """One child span of a request."""

    def set(self, key: str, value: AttributeValue) -> None:
        """Set an attribute."""

    def end(self) -> None:
        """End the span (later calls do nothing)."""


class RequestTrace(Protocol):
    """The spans of one request: a server span and its children."""

    def child(self, name: str, *, client: bool = False) -> Span:
        """Start a child span of the server span (``client``: a call out)."""

    def set(self, key: str, value: AttributeValue) -> None:
        """Set an attribute on the server span."""

    def tenant(self, tenant_id: str) -> None:
        """The request's tenant, for the server span and every child."""

    def inject(self, headers: dict[str, str], span: Span) -> None:
        """Add ``span``'s ``traceparent`` to outgoing ``headers``."""

    def end(self, status: int) -> None:
        """End the server span with the HTTP status (children still open end too)."""


class Tracing(Protocol):
    """Starts request traces; one per gateway process."""

    @property
    def enabled(self) -> bool:
        """Whether spans are recorded."""

    def request(
        self, request_id: str, method: str, route: str, headers: Mapping[str, str]
    ) -> RequestTrace:
        """The trace of one request, continuing ``headers``' ``traceparent``."""

    def shutdown(self) -> None:
        """Flush and stop exporting (blocking: run it off the event loop)."""


class _NoSpan:
    __slots__ = ()

    def set(self, key: str, value: AttributeValue) -> None:
        """Nothing to set."""

    def end(self) -> None:
        """Nothing to end."""


_NO_SPAN = _NoSpan()


class _NoTrace:
    __slots__ = ()

    def child(self, name: str, *, client: bool = False) -> Span:
        return _NO_SPAN

    def set(self, key: str, value: AttributeValue) -> None:
        """Nothing to set."""

    def tenant(self, tenant_id: str) -> None:
        """Nothing to record."""

    def inject(self, headers: dict[str, str], span: Span) -> None:
        """Nothing to propagate."""

    def end(self, status: int) -> None:
        """Nothing to end."""


_NO_TRACE = _NoTrace()


class _NoTracing:
    __slots__ = ()

    @property
    def enabled(self) -> bool:
        return False

    def request(
        self, request_id: str, method: str, route: str, headers: Mapping[str, str]
    ) -> RequestTrace:
        return _NO_TRACE

    def shutdown(self) -> None:
        """Nothing to flush."""


NO_TRACING: Tracing = _NoTracing()
"""Tracing off: the same do-nothing trace for every request."""


class _OtelSpan:
    __slots__ = ("_ended", "_span")

    def __init__(self, span: Any) -> None:
        self._span = span
        self._ended = False

    def set(self, key: str, value: AttributeValue) -> None:
        self._span.set_attribute(key, value)

    def end(self) -> None:
        if not self._ended:
            self._ended = True
            self._span.end()


class _OtelTrace:
    __slots__ = ("_attributes", "_children", "_context", "_server", "_tracing")

    def __init__(self, tracing: OtelTracing, server: Any, request_id: str) -> None:
        self._tracing = tracing
        self._server = server
        self._context = tracing.set_span_in_context(server)
        self._attributes: dict[str, AttributeValue] = {
            REQUEST_ID: request_id,
            TENANT: UNKNOWN_TENANT,
        }
        self._children: list[_OtelSpan] = []

    def child(self, name: str, *, client: bool = False) -> Span:
        kind = self._tracing.kind_client if client else self._tracing.kind_internal
        span = self._tracing.tracer.start_span(
            name, context=self._context, kind=kind, attributes=self._attributes
        )
        handle = _OtelSpan(span)
        self._children.append(handle)
        return handle

    def set(self, key: str, value: AttributeValue) -> None:
        self._server.set_attribute(key, value)

    def tenant(self, tenant_id: str) -> None:
        self._attributes[TENANT] = tenant_id
        self._server.set_attribute(TENANT, tenant_id)
        for child in self._children:
            if not child._ended:
                child.set(TENANT, tenant_id)

    def inject(self, headers: dict[str, str], span: Span) -> None:
        if isinstance(span, _OtelSpan):
            self._tracing.inject(headers, context=self._tracing.set_span_in_context(span._span))

    def end(self, status: int) -> None:
        error = self._tracing.status_error
        for child in self._children:
            if not child._ended:
                # Still open: the request ended inside this step.
                child._span.set_status(error, f"HTTP {status}")
                child.end()
        self._server.set_attribute("http.response.status_code", status)
        if status >= 500:
            self._server.set_status(error, f"HTTP {status}")
        self._server.end()


class OtelTracing:
    """Tracing through an OpenTelemetry SDK ``TracerProvider`` of its own
    (never the process-global one, so several gateways never mix spans)."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import propagate, trace
        from opentelemetry.trace import SpanKind, StatusCode

        self._provider = provider
        self.tracer = provider.get_tracer("tollgate.gateway")
        self.set_span_in_context = trace.set_span_in_context
        self.inject = propagate.inject
        self._extract = propagate.extract
        self._kind_server = SpanKind.SERVER
        self.kind_client = SpanKind.CLIENT
        self.kind_internal = SpanKind.INTERNAL
        self.status_error = StatusCode.ERROR

    @property
    def enabled(self) -> bool:
        """Always: spans are recorded (subject to the SDK's sampler)."""
        return True

    def request(
        self, request_id: str, method: str, route: str, headers: Mapping[str, str]
    ) -> RequestTrace:
        """A server span named ``METHOD route``, child of the client's trace if any."""
        parent = self._extract(headers)
        server = self.tracer.start_span(
            f"{method} {route}",
            context=parent,
            kind=self._kind_server,
            attributes={
                REQUEST_ID: request_id,
                TENANT: UNKNOWN_TENANT,
                "http.request.method": method,
                "http.route": route,
            },
        )
        return _OtelTrace(self, server, request_id)

    def shutdown(self) -> None:
        """Flush pending spans and stop the exporter."""
        self._provider.shutdown()


def _provider(processor: Any) -> Any:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    resource = Resource.create()
    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win when set.
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(processor)
    return provider


def tracing_with_exporter(exporter: Any, *, batch: bool = True) -> Tracing:
    """Tracing into ``exporter`` (an SDK ``SpanExporter``); ``batch`` False
    exports each span as it ends (tests)."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
    return OtelTracing(_provider(processor))


def build_tracing(endpoint: str | None) -> Tracing:
    """``NO_TRACING`` without an endpoint; else OTLP over HTTP to ``endpoint``
    (the traces URL, e.g. ``http://collector:4318/v1/traces``). Without the
    ``tracing`` extra installed, tracing stays off and a warning says why:
    observability never stops the gateway from serving."""
    if not endpoint:
        return NO_TRACING
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        log.warning(
            "tracing_unavailable",
            endpoint=endpoint,
            fix="pip install 'tollgate[tracing]'",
        )
        return NO_TRACING
    log.info("tracing_enabled", endpoint=endpoint, pid=os.getpid())
    return tracing_with_exporter(OTLPSpanExporter(endpoint=endpoint))
