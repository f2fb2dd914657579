"""Observing the gateway: Prometheus metrics, readiness, optional tracing.

    labels.py     bounded label values (pure)
    metrics.py    GatewayMetrics: the request metrics of one gateway process
    exposition.py the text format those are rendered in
    state.py      families read at scrape time from the process's live state
    request.py    RequestObserver: one inference request's metrics and trace
    readiness.py  the checks behind GET /readyz
    tracing.py    OpenTelemetry spans, when configured (imported lazily)

See docs/metrics.md for every metric, its labels and buckets.
"""
