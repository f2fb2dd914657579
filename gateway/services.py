"""The long-lived objects a gateway process owns, built in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
from litestar import Request

from gateway.auth.verifier import Authenticator
from gateway.observe.metrics import GatewayMetrics
from gateway.observe.request_log import RequestLog
from gateway.observe.tracing import Tracing
from gateway.policy.watcher import PolicyWatcher
from gateway.queueing.registry import PoolQueues
from gateway.quota.admission import Quota
from gateway.routing.picker import TurnCounter
from gateway.routing.router import Router
from gateway.settings import GatewaySettings
from gateway.upstream.health import ReplicaBook
from gateway.upstream.proxy import UpstreamClient


@dataclass
class Services:
    """Shared by every request of one gateway process."""

    settings: GatewaySettings
    http: httpx.AsyncClient
    authenticator: Authenticator
    policies: PolicyWatcher
    upstream: UpstreamClient
    turns: TurnCounter
    queues: PoolQueues
    quota: Quota
    replicas: ReplicaBook
    """Health, load and in-flight bookkeeping of every backend replica."""
    router: Router
    metrics: GatewayMetrics
    """This process's Prometheus metrics (its own registry)."""
    tracing: Tracing
    """Request spans, or the do-nothing tracing when none is configured."""
    request_log: RequestLog
    """Each inference request's log line, written off the request's path."""


def services_of(request: Request[Any, Any, Any]) -> Services:
    """The process's services, stored on the app state by the lifespan."""
    services: Services = request.app.state.services
    return services
