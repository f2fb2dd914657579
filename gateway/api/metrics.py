"""``GET /metrics``: Prometheus text for the replicas' health and load.

Rendered from ``ReplicaBook.status()`` on each scrape (no global registry):

- ``tollgate_replica_healthy`` (1 healthy, 0 ejected), by pool and replica;
- ``tollgate_replica_in_flight`` and ``tollgate_replica_load_tokens``;
- ``tollgate_replica_requests_total``, ``tollgate_replica_failures_total``,
  ``tollgate_replica_ejections_total``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from litestar import Request, Response, get

from gateway.services import services_of
from gateway.upstream.health import ReplicaStatus

_FAMILIES = (
    ("tollgate_replica_healthy", "gauge", "1 when the replica takes requests, 0 when ejected"),
    ("tollgate_replica_in_flight", "gauge", "requests this gateway has in flight on the replica"),
    ("tollgate_replica_load_tokens", "gauge", "tokens queued and decoding (best estimate)"),
    ("tollgate_replica_requests_total", "counter", "requests sent to the replica"),
    ("tollgate_replica_failures_total", "counter", "failed requests and probes"),
    ("tollgate_replica_ejections_total", "counter", "times the replica was ejected"),
)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_replica_metrics(statuses: Sequence[ReplicaStatus]) -> str:
    """The Prometheus exposition text for ``statuses``."""
    values: dict[str, list[tuple[ReplicaStatus, float]]] = {name: [] for name, _, _ in _FAMILIES}
    for s in statuses:
        values["tollgate_replica_healthy"].append((s, 1.0 if s.ejected_for_s == 0 else 0.0))
        values["tollgate_replica_in_flight"].append((s, s.in_flight))
        values["tollgate_replica_load_tokens"].append((s, s.load_tokens))
        values["tollgate_replica_requests_total"].append((s, s.num_requests))
        values["tollgate_replica_failures_total"].append((s, s.num_failures))
        values["tollgate_replica_ejections_total"].append((s, s.num_ejections))
    lines: list[str] = []
    for name, kind, help_text in _FAMILIES:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for s, value in values[name]:
            labels = f'pool="{_label(s.pool)}",replica="{_label(s.url)}"'
            lines.append(f"{name}{{{labels}}} {value:g}")
    return "\n".join(lines) + "\n"


@get("/metrics")
async def metrics(request: Request[Any, Any, Any]) -> Response[str]:
    """Replica health and load in Prometheus text format (unauthenticated,
    like /healthz: scrape it from inside the network)."""
    text = render_replica_metrics(services_of(request).replicas.status())
    return Response(text, media_type="text/plain; version=0.0.4")
