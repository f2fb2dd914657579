"""``GET /metrics``: the process's Prometheus metrics (docs/metrics.md).

Unauthenticated, like /healthz: scrape it from inside the network. The
scrape pings the quota store (``tollgate_quota_store_up``), copies the
request metrics and the loop-owned state (replicas, queues, policy reloads)
on the event loop, and renders the text in a worker thread, so a large
exposition never stalls requests in flight for long.
"""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Request, Response, get

from gateway.observe.metrics import CONTENT_TYPE, render
from gateway.observe.readiness import check_store
from gateway.observe.state import take_snapshot
from gateway.services import services_of


@get("/metrics")
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Every metric of this process, in the Prometheus text format."""
    services = services_of(request)
    store = services.quota.store
    up = (await check_store(store)).ok
    # Both copies on the event loop, which owns everything they read.
    state = take_snapshot(services.replicas, services.queues, services.policies, store, store_up=up)
    text = await asyncio.to_thread(render, services.metrics.freeze(), state)
    return Response(text, media_type=CONTENT_TYPE)
