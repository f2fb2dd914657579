"""The runtime form of the policy: frozen, cross-checked, and ready for lookups.

``Policy`` is built once per successful load (``gateway.policy.loader``) and
swapped in as a whole; a request captures one ``Policy`` and uses it to the
end, so a reload never changes the rules under a request in flight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import date, datetime
from decimal import Decimal
from types import MappingProxyType
from typing import Literal

TenantTier = Literal["free", "standard", "enterprise"]
ModelTier = Literal["small", "large"]
PoolKind = Literal["tollgate", "vllm", "trtllm", "openai"]
StoreFailureMode = Literal["fail_closed", "fail_open"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Quota limits; ``None`` means not enforced at this level."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    max_prompt_tokens: int | None = None
    max_output_tokens: int | None = None
    time_zone: str | None = None

    def overridden_by(self, override: Limits) -> Limits:
        """These limits with every field that ``override`` sets replaced."""
        merged = {
            f.name: getattr(override, f.name)
            if getattr(override, f.name) is not None
            else getattr(self, f.name)
            for f in fields(self)
        }
        return Limits(**merged)


@dataclass(frozen=True, slots=True)
class LimitSet:
    """Limits at one level (tenant or app) with their per-model overrides."""

    base: Limits = field(default_factory=Limits)
    model_overrides: Mapping[str, Limits] = field(default_factory=lambda: MappingProxyType({}))

    def for_model(self, model: str) -> Limits:
        """The limits that apply to requests for ``model`` at this level."""
        override = self.model_overrides.get(model)
        return self.base if override is None else self.base.overridden_by(override)


@dataclass(frozen=True, slots=True)
class AppPolicy:
    """An application inside a tenant; its limits apply in addition to the tenant's."""

    app_id: str
    limits: LimitSet


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    """One tenant's rules, compiled from ``tenants/<id>.yaml``."""

    tenant_id: str
    display_name: str
    tier: TenantTier
    enabled: bool
    all_models: bool
    """True when the file says ``allowed_models: ["*"]``."""
    allowed_models: frozenset[str]
    """The models listed by name (empty when ``all_models``)."""
    default_priority: str
    allowed_priorities: tuple[str, ...]
    limits: LimitSet
    on_store_failure: StoreFailureMode
    apps: Mapping[str, AppPolicy]

    def may_use(self, model: str) -> bool:
        """Whether this tenant's file allows ``model`` (existence is checked elsewhere)."""
        return self.all_models or model in self.allowed_models

    def app_limits(self, app_id: str | None, model: str) -> Limits | None:
        """The app-level limits for ``model``, or None when the app has none configured."""
        if app_id is None:
            return None
        app = self.apps.get(app_id)
        return None if app is None else app.limits.for_model(model)


@dataclass(frozen=True, slots=True)
class Replica:
    """One backend endpoint; weight 0 means drained."""

    url: str
    weight: float


@dataclass(frozen=True, slots=True)
class UpstreamTimeouts:
    """Timeouts for one pool's upstream requests, in seconds."""

    connect_s: float
    first_byte_s: float
    between_chunks_s: float
    total_s: float


@dataclass(frozen=True, slots=True)
class Pool:
    """Interchangeable replicas of one backend kind."""

    name: str
    kind: PoolKind
    replicas: tuple[Replica, ...]
    timeouts: UpstreamTimeouts


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """A model as clients name it, and everything needed to send it upstream."""

    name: str
    upstream_model: str
    tier: ModelTier
    context_length: int
    pool: Pool
    tokenizer: str | None = None


@dataclass(frozen=True, slots=True)
class PriorityClass:
    """A queueing class; lower ``priority`` is served first."""

    name: str
    priority: int
    max_queue_wait_s: float


@dataclass(frozen=True, slots=True)
class Price:
    """Prices per million tokens from ``effective_from`` (a UTC day) on."""

    effective_from: date
    input_per_million: Decimal
    output_per_million: Decimal
    cached_input_per_million: Decimal


@dataclass(frozen=True, slots=True)
class Pricing:
    """Price history per model, each sorted by ``effective_from``."""

    currency: str
    prices: Mapping[str, tuple[Price, ...]]

    def price_for(self, model: str, day: date) -> Price | None:
        """The price in force for ``model`` on ``day``, or None before the first one."""
        current: Price | None = None
        for price in self.prices.get(model, ()):
            if price.effective_from > day:
                break
            current = price
        return current


@dataclass(frozen=True, slots=True)
class Policy:
    """Everything the gateway decides from, as of one successful load."""

    version: str
    """A hash of the files' contents: equal content, equal version."""
    loaded_at: datetime
    tenants: Mapping[str, TenantPolicy]
    models: Mapping[str, ModelRoute]
    pools: Mapping[str, Pool]
    priority_classes: Mapping[str, PriorityClass]
    pricing: Pricing

    def tenant(self, tenant_id: str) -> TenantPolicy | None:
        """The tenant with this id, or None."""
        return self.tenants.get(tenant_id)

    def models_for(self, tenant: TenantPolicy) -> list[ModelRoute]:
        """The models ``tenant`` may use, in name order."""
        return [route for name, route in sorted(self.models.items()) if tenant.may_use(name)]

    def model_for(self, tenant: TenantPolicy, name: str) -> ModelRoute | None:
        """The route for ``name`` when it exists and ``tenant`` may use it, else None."""
        route = self.models.get(name)
        return route if route is not None and tenant.may_use(name) else None

    def allows_model(self, tenant: TenantPolicy, name: str) -> bool:
        """Whether ``name`` exists and ``tenant`` may use it."""
        return self.model_for(tenant, name) is not None
