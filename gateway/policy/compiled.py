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
BalanceStrategy = Literal["round_robin", "least_load"]
AffinityMode = Literal["none", "session", "prefix"]
FeatureName = Literal[
    "prompt_tokens",
    "turns",
    "code",
    "math",
    "reasoning",
    "long_answer",
    "tools",
    "max_tokens",
    "system_hint",
    "simple_task",
]
"""The ``auto`` classifier's features (gateway.routing.classifier, docs/routing.md)."""
TIER_NAMES: tuple[ModelTier, ...] = ("small", "large")
AUTO_MODEL = "auto"
VIRTUAL_MODEL_NAMES: frozenset[str] = frozenset({AUTO_MODEL, *TIER_NAMES})
"""Names a client may send that stand for a concrete model chosen at request time."""


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
    max_in_flight: int = 32
    """Requests the gateway sends it at once; more wait in the pool's queue."""


@dataclass(frozen=True, slots=True)
class UpstreamTimeouts:
    """Timeouts for one pool's upstream requests, in seconds."""

    connect_s: float
    first_byte_s: float
    between_chunks_s: float
    total_s: float


@dataclass(frozen=True, slots=True)
class BalancerConfig:
    """How a pool spreads requests over its replicas (docs/routing.md)."""

    strategy: BalanceStrategy = "least_load"
    affinity: AffinityMode = "prefix"
    prefix_chars: int = 1024
    """Characters of the prompt hashed for prefix affinity."""
    load_factor: float = 1.5
    """Affinity yields to least load when the preferred replica's load is over
    this factor of the pool's average ..."""
    load_slack_tokens: int = 2048
    """... and more than this many tokens above the least loaded replica."""
    max_attempts: int = 3
    """Replicas tried for one request (connect errors, 5xx before the first byte)."""


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """Active probes, load polling and passive ejection of one pool's replicas."""

    liveness_path: str | None = "/health"
    readiness_path: str | None = "/ready"
    probe_interval_s: float = 2.0
    probe_timeout_s: float = 2.0
    deep_probe_interval_s: float | None = None
    """Generate one token this often (None: never)."""
    load_interval_s: float = 0.5
    failures_to_eject: int = 3
    successes_to_restore: int = 2
    ejection_base_s: float = 2.0
    """First ejection's length; each further ejection in a row doubles it."""
    ejection_max_s: float = 60.0


@dataclass(frozen=True, slots=True)
class Pool:
    """Interchangeable replicas of one backend kind."""

    name: str
    kind: PoolKind
    replicas: tuple[Replica, ...]
    timeouts: UpstreamTimeouts
    balancer: BalancerConfig = field(default_factory=BalancerConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    required: bool = False
    """Readiness (``GET /readyz``) needs a healthy replica of this pool."""

    @property
    def capacity(self) -> int:
        """Concurrent requests the pool takes: ``max_in_flight`` summed over
        the replicas that are not drained (at least 1)."""
        return max(1, sum(r.max_in_flight for r in self.replicas if r.weight > 0))


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """One version of a model inside its pool, with its share of the traffic."""

    name: str
    upstream_model: str
    weight: float = 1.0
    replicas: frozenset[str] | None = None
    """URLs of the pool's replicas that serve it; None: every replica."""


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """A model as clients name it, and everything needed to send it upstream."""

    name: str
    upstream_model: str
    """The first version's upstream name (the only one without a canary)."""
    tier: ModelTier
    context_length: int
    pool: Pool
    tokenizer: str | None = None
    versions: tuple[ModelVersion, ...] = ()
    """A canary split; empty means one version, ``upstream_model`` on every replica."""

    @property
    def served_versions(self) -> tuple[ModelVersion, ...]:
        """The versions traffic is split over (at least one)."""
        return self.versions or (ModelVersion("default", self.upstream_model),)


@dataclass(frozen=True, slots=True)
class PriorityClass:
    """A queueing class: its share of a saturated pool is proportional to
    ``weight``; ``priority`` (lower first) breaks ties (docs/queueing.md)."""

    name: str
    priority: int
    max_queue_wait_s: float
    weight: float = 1.0
    max_queue_length: int = 1000
    """Requests of this class that may wait per pool; more are refused."""


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
class ClassifierConfig:
    """Weights and thresholds of the ``auto`` classifier (gateway.routing.classifier).

    The score is ``bias`` plus the sum of ``weights[f] * value(f)`` over the
    features; ``large`` when the score is at least ``threshold``.
    """

    threshold: float = 1.0
    bias: float = 0.0
    weights: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    long_prompt_tokens: int = 1500
    """Prompt tokens at which the ``prompt_tokens`` feature reaches 1."""
    long_output_tokens: int = 2048
    """Requested ``max_tokens`` at which ``max_tokens`` reaches 1."""
    many_turns: int = 6
    """User turns at which ``turns`` reaches 1."""


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    """What the names ``small``, ``large`` and ``auto`` mean."""

    tiers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """Tier -> the concrete model it names; a tier absent here cannot be named."""
    tenant_tiers: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    """Tenant tier -> the model tiers its tenants may use (absent: all)."""
    fallback: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """Tier -> the tier to use when its pool has no healthy replica or its
    queue is full (absent: 503)."""
    auto: ClassifierConfig | None = None
    """The ``auto`` classifier; None: the name ``auto`` is not offered."""

    def tiers_for(self, tenant: TenantPolicy) -> tuple[str, ...]:
        """The model tiers ``tenant``'s tier may use."""
        return self.tenant_tiers.get(tenant.tier, TIER_NAMES)


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
    routing: RoutingPolicy = field(default_factory=RoutingPolicy)
    longest_queue_wait_s: float = field(init=False)
    """The longest ``max_queue_wait_s`` of any priority class (0 without
    classes): how long any request may wait for a slot."""

    def __post_init__(self) -> None:
        longest = max((c.max_queue_wait_s for c in self.priority_classes.values()), default=0.0)
        object.__setattr__(self, "longest_queue_wait_s", longest)

    def tenant(self, tenant_id: str) -> TenantPolicy | None:
        """The tenant with this id, or None."""
        return self.tenants.get(tenant_id)

    def models_for(self, tenant: TenantPolicy) -> list[ModelRoute]:
        """The models ``tenant`` may use, in name order."""
        return [route for _, route in sorted(self.models.items()) if self.usable(tenant, route)]

    def model_for(self, tenant: TenantPolicy, name: str) -> ModelRoute | None:
        """The route for ``name`` when it exists and ``tenant`` may use it, else None."""
        route = self.models.get(name)
        return route if route is not None and self.usable(tenant, route) else None

    def usable(self, tenant: TenantPolicy, route: ModelRoute) -> bool:
        """Whether ``tenant`` may use ``route``: its file lists the model and
        its tier (``routing.tenant_tiers``) allows the model's tier."""
        return tenant.may_use(route.name) and route.tier in self.routing.tiers_for(tenant)

    def allows_model(self, tenant: TenantPolicy, name: str) -> bool:
        """Whether ``name`` exists and ``tenant`` may use it."""
        return self.model_for(tenant, name) is not None
