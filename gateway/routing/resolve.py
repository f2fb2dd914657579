"""From the model name a client sent to the concrete model and version that serve it.

A pure function of the policy, the tenant, the request and an availability
check (``resolve_route``):

- a concrete model name is served as asked (``explicit``), never replaced;
- ``small`` and ``large`` name the models in ``routing.tiers`` (``tier``);
- ``auto`` asks the classifier (``gateway.routing.classifier``), then
  limits the answer to the tiers the tenant may use (``routing.tenant_tiers``
  and its ``allowed_models``): a free tenant pinned to ``small`` gets
  ``small`` whatever the score;
- ``small``, ``large`` and ``auto`` fall back to the tier in
  ``routing.fallback`` when the chosen pool has no healthy replica or the
  request's priority queue there is full; without a usable fallback, no
  healthy replica is a 503 with Retry-After, and a full queue is left to the
  queue, which refuses with its own 503 ``queue_full``;
- the version inside the model's pool comes from its canary weights, sticky
  per session id (``gateway.routing.canary``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from gateway.errors import NotFoundError, PermissionDeniedError, ServiceUnavailableError
from gateway.policy.compiled import (
    AUTO_MODEL,
    TIER_NAMES,
    ModelRoute,
    ModelTier,
    ModelVersion,
    Policy,
    TenantPolicy,
)
from gateway.routing.canary import choose_version
from gateway.routing.classifier import Classification, classify, extract_features

RouteKind = Literal["explicit", "tier", "auto"]
UnavailableReason = Literal["no_healthy_replica", "queue_full"]


@dataclass(frozen=True, slots=True)
class Unavailable:
    """Why a model's pool cannot take a request now."""

    reason: UnavailableReason
    retry_after_s: float = 1.0


Availability = Callable[[ModelRoute, ModelVersion], Unavailable | None]
"""None when the pool can serve the version now, else why not."""


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """The model and version that serve a request, and why."""

    requested: str
    route: ModelRoute
    version: ModelVersion
    kind: RouteKind
    classification: Classification | None = None
    """The classifier's verdict (``auto`` only)."""
    pinned_by: str | None = None
    """The tenant tier that overrode the classifier's tier, if it did."""
    fallback_from: ModelTier | None = None
    fallback_reason: UnavailableReason | None = None

    @property
    def tier(self) -> ModelTier:
        """The tier of the model that serves the request."""
        return self.route.tier

    def header(self) -> str:
        """The ``x-tollgate-route`` value (docs/api.md)."""
        if self.kind == "explicit":
            return "explicit"
        parts = [self.kind if self.kind == "auto" else "tier", f"tier={self.tier}"]
        if self.classification is not None:
            parts.append(f"score={self.classification.score:.3f}")
            reasons = self.classification.reason_names()
            if reasons:
                parts.append("reasons=" + ",".join(reasons))
        if self.pinned_by is not None:
            parts.append(f"pinned={self.pinned_by}")
        if self.fallback_from is not None:
            parts.append(f"fallback={self.fallback_from}:{self.fallback_reason}")
        return "; ".join(parts)

    def log_fields(self) -> dict[str, Any]:
        """Fields for the request log line (and later the usage record)."""
        fields: dict[str, Any] = {
            "model_requested": self.requested,
            "model_version": self.version.name,
            "upstream_model": self.version.upstream_model,
            "route": self.kind,
            "tier": self.tier,
        }
        if self.classification is not None:
            fields["route_score"] = self.classification.score
            fields["route_reasons"] = {
                r.feature: r.contribution for r in self.classification.reasons
            }
        if self.pinned_by is not None:
            fields["route_pinned_by"] = self.pinned_by
        if self.fallback_from is not None:
            fields["route_fallback_from"] = self.fallback_from
            fields["route_fallback_reason"] = self.fallback_reason
        return fields


def _not_allowed(tenant: TenantPolicy, name: str) -> PermissionDeniedError:
    return PermissionDeniedError(
        f"tenant '{tenant.tenant_id}' may not use the model '{name}'",
        code="model_not_allowed",
        param="model",
    )


def _no_replica(name: str, retry_after_s: float) -> ServiceUnavailableError:
    return ServiceUnavailableError(
        f"no healthy backend replica can serve the model '{name}' now; retry later",
        retry_after_s=retry_after_s,
        code="no_healthy_replica",
    )


def usable_tiers(policy: Policy, tenant: TenantPolicy) -> dict[ModelTier, ModelRoute]:
    """The tier names ``tenant`` may use, with the model each stands for."""
    usable: dict[ModelTier, ModelRoute] = {}
    for tier in TIER_NAMES:
        name = policy.routing.tiers.get(tier)
        route = policy.models.get(name) if name is not None else None
        if route is not None and policy.usable(tenant, route):
            usable[tier] = route
    return usable


def virtual_models_for(policy: Policy, tenant: TenantPolicy) -> list[str]:
    """The names ``small``, ``large`` and ``auto`` that ``tenant`` may send."""
    tiers = usable_tiers(policy, tenant)
    names: list[str] = list(tiers)
    if tiers and policy.routing.auto is not None:
        names.append(AUTO_MODEL)
    return names


def resolve_route(
    policy: Policy,
    tenant: TenantPolicy,
    requested: str,
    body: Mapping[str, Any],
    kind: str,
    *,
    version_key: str,
    availability: Availability,
) -> RouteDecision:
    """The decision for one request (see the module docstring).

    ``version_key`` picks the canary version (the session id, else the
    request id). Raises NotFoundError (404), PermissionDeniedError (403
    ``model_not_allowed``) or ServiceUnavailableError (503
    ``no_healthy_replica``).
    """
    route = policy.models.get(requested)
    if route is not None:
        if not policy.usable(tenant, route):
            raise _not_allowed(tenant, requested)
        version = choose_version(route.served_versions, route.name, version_key)
        unavailable = availability(route, version)
        if unavailable is not None and unavailable.reason == "no_healthy_replica":
            raise _no_replica(route.name, unavailable.retry_after_s)
        return RouteDecision(requested, route, version, "explicit")

    tiers = usable_tiers(policy, tenant)
    classification: Classification | None = None
    pinned_by: str | None = None
    if requested in TIER_NAMES:
        if requested not in policy.routing.tiers:
            raise NotFoundError(f"The model '{requested}' does not exist", param="model")
        wanted: ModelTier = "small" if requested == "small" else "large"
        if wanted not in tiers:
            raise _not_allowed(tenant, requested)
        route_kind: RouteKind = "tier"
    elif requested == AUTO_MODEL and policy.routing.auto is not None and policy.routing.tiers:
        if not tiers:
            raise _not_allowed(tenant, requested)
        config = policy.routing.auto
        classification = classify(extract_features(body, kind, config), config)
        wanted = classification.tier
        if wanted not in tiers:
            wanted = next(iter(tiers))
            pinned_by = tenant.tier
        route_kind = "auto"
    else:
        raise NotFoundError(f"The model '{requested}' does not exist", param="model")

    route = tiers[wanted]
    version = choose_version(route.served_versions, route.name, version_key)
    unavailable = availability(route, version)
    if unavailable is None:
        return RouteDecision(requested, route, version, route_kind, classification, pinned_by)
    other = policy.routing.fallback.get(wanted)
    if other is not None and other in tiers:
        other_route = tiers[other]
        other_version = choose_version(other_route.served_versions, other_route.name, version_key)
        if availability(other_route, other_version) is None:
            return RouteDecision(
                requested,
                other_route,
                other_version,
                route_kind,
                classification,
                pinned_by,
                fallback_from=wanted,
                fallback_reason=unavailable.reason,
            )
    if unavailable.reason == "no_healthy_replica":
        raise _no_replica(route.name, unavailable.retry_after_s)
    # A full queue and nowhere else to go: the queue refuses with its own 503.
    return RouteDecision(requested, route, version, route_kind, classification, pinned_by)
