"""The routing edge: feeds the pure decisions with the process's live state.

``Router.decide`` resolves a model name (``gateway.routing.resolve``) with an
availability check read from the replicas' health (``ReplicaBook``) and the
pool queues (``PoolQueues``); ``Router.replicas_for`` orders the healthy
replicas of the chosen pool and version for one request
(``gateway.routing.picker``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from gateway.errors import ServiceUnavailableError
from gateway.policy.compiled import (
    ModelRoute,
    ModelVersion,
    Policy,
    PriorityClass,
    Replica,
    TenantPolicy,
)
from gateway.queueing.registry import PoolQueues
from gateway.routing.affinity import affinity_key
from gateway.routing.picker import TurnCounter, pick
from gateway.routing.resolve import Availability, RouteDecision, Unavailable, resolve_route
from gateway.upstream.health import ReplicaBook


class Router:
    """Route decisions and replica order for one gateway process."""

    def __init__(self, book: ReplicaBook, queues: PoolQueues, turns: TurnCounter) -> None:
        self.book = book
        self.queues = queues
        self.turns = turns

    def availability(self, priority: PriorityClass) -> Availability:
        """Whether a pool can take a request of class ``priority`` now: it
        has a healthy replica serving the version, and the class's queue in
        it is not full (``PoolQueue`` state, as the queue itself would judge)."""

        def check(route: ModelRoute, version: ModelVersion) -> Unavailable | None:
            pool = route.pool
            now = time.monotonic()
            if not self.book.can_serve(pool, version, now):
                return Unavailable("no_healthy_replica", self.book.retry_after_s(pool, now))
            queue = self.queues.for_pool(pool)
            if (
                queue.in_flight >= queue.capacity
                and queue.depth(priority.name) >= priority.max_queue_length
            ):
                return Unavailable("queue_full")
            return None

        return check

    def decide(
        self,
        policy: Policy,
        tenant: TenantPolicy,
        requested: str,
        body: Mapping[str, Any],
        kind: str,
        priority: PriorityClass,
        *,
        session_id: str | None,
        request_id: str,
    ) -> RouteDecision:
        """The model and version for one request (``resolve_route``)."""
        return resolve_route(
            policy,
            tenant,
            requested,
            body,
            kind,
            version_key=session_id if session_id is not None else request_id,
            availability=self.availability(priority),
        )

    def replicas_for(
        self,
        decision: RouteDecision,
        body: Mapping[str, Any],
        kind: str,
        session_id: str | None,
    ) -> list[Replica]:
        """The replicas to try for one request, best first, at most the
        pool's ``max_attempts``; 503 ``no_healthy_replica`` when none may
        take it now."""
        pool = decision.route.pool
        views = self.book.views(pool, decision.version)
        if not views:
            raise ServiceUnavailableError(
                f"no healthy backend replica can serve the model '{decision.route.name}' "
                "now; retry later",
                retry_after_s=self.book.retry_after_s(pool),
                code="no_healthy_replica",
            )
        config = pool.balancer
        key = affinity_key(config, session_id, body, kind) if len(views) > 1 else None
        order = pick(views, config, key, self.turns.next(pool.name))
        return order[: config.max_attempts]
