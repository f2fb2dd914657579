"""The YAML formats admins write, as strict pydantic models.

Two kinds of file:

- ``tenants/<id>.yaml``: one ``TenantFile`` each.
- ``policies/*.yaml``: any number of files whose top-level keys are merged
  into one ``PolicyDocument`` (``models``, ``pools``, ``priority_classes``,
  ``currency``, ``prices``, ``routing``); a key defined in two files is an error.

Every model forbids unknown keys and coerces nothing (``"60"`` is not an
integer), so a typo is an error instead of a silently ignored setting.
Cross-file rules (a tenant's models exist, its priorities are defined, every
model has a price) live in ``gateway.policy.loader``.
"""

from __future__ import annotations

import zoneinfo
from datetime import date
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from gateway.policy.compiled import (
    AffinityMode,
    BalanceStrategy,
    FeatureName,
    ModelTier,
    PoolKind,
    StoreFailureMode,
    TenantTier,
)

TenantId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")]
# One pattern rather than a union, so validation errors point at the item itself.
ModelOrWildcard = Annotated[
    str, StringConstraints(pattern=r"^(\*|[A-Za-z0-9][A-Za-z0-9._:/-]{0,127})$")
]
PositiveInt = Annotated[int, Field(gt=0)]
Seconds = Annotated[float, Field(gt=0)]
Url = Annotated[str, StringConstraints(pattern=r"^https?://[^\s/]+(/\S*)?$")]
UrlPath = Annotated[str, StringConstraints(pattern=r"^/\S*$")]
Finite = Annotated[float, Field(allow_inf_nan=False)]


def _to_decimal(value: Any) -> Any:
    # YAML reads 0.15 as a float; going through str keeps the digits the admin wrote.
    if isinstance(value, bool):
        raise ValueError("a price is a number, not a boolean")
    if isinstance(value, int | float | str):
        try:
            return Decimal(str(value))
        except InvalidOperation as exc:
            raise ValueError(f"not a number: {value!r}") from exc
    return value


Money = Annotated[
    Decimal, BeforeValidator(_to_decimal), Field(ge=0, strict=False, allow_inf_nan=False)
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Limits(_Strict):
    """Quota limits; an absent limit is not enforced at this level."""

    requests_per_minute: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None
    max_concurrent: PositiveInt | None = None
    tokens_per_day: PositiveInt | None = None
    tokens_per_month: PositiveInt | None = None
    max_prompt_tokens: PositiveInt | None = None
    max_output_tokens: PositiveInt | None = None
    time_zone: str | None = Field(
        default=None, description="IANA zone where days and months start (default UTC)"
    )

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                zoneinfo.ZoneInfo(value)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {value!r}") from None
        return value


class LimitsWithOverrides(Limits):
    """Limits, plus per-model limits that replace the listed fields for that model."""

    model_overrides: dict[Name, Limits] = Field(default_factory=dict)


class AppFile(_Strict):
    """An application inside a tenant, with limits of its own under the tenant's."""

    limits: LimitsWithOverrides = Field(default_factory=LimitsWithOverrides)


class TenantFile(_Strict):
    """``tenants/<id>.yaml``: who a tenant is and what it may use."""

    id: TenantId = Field(description="must equal the file name without .yaml")
    display_name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    tier: TenantTier
    enabled: bool = True
    allowed_models: list[ModelOrWildcard] = Field(
        min_length=1, description='model names, or ["*"] for every model'
    )
    default_priority: Name
    allowed_priorities: list[Name] = Field(min_length=1)
    limits: LimitsWithOverrides = Field(default_factory=LimitsWithOverrides)
    on_store_failure: StoreFailureMode = "fail_closed"
    apps: dict[Name, AppFile] = Field(default_factory=dict)

    @field_validator("allowed_models")
    @classmethod
    def _wildcard_alone(cls, value: list[str]) -> list[str]:
        if "*" in value and len(value) > 1:
            raise ValueError('"*" already allows every model; list it alone')
        if len(set(value)) != len(value):
            raise ValueError("a model is listed twice")
        return value

    @field_validator("allowed_priorities")
    @classmethod
    def _unique_priorities(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a priority class is listed twice")
        return value


class UpstreamTimeoutsFile(_Strict):
    """Timeouts for requests to a pool's replicas, in seconds."""

    connect_s: Seconds = 5.0
    first_byte_s: Seconds = 60.0
    between_chunks_s: Seconds = 30.0
    total_s: Seconds = 600.0


class ReplicaFile(_Strict):
    """One backend endpoint; ``weight`` 0 drains it without removing it."""

    url: Url
    weight: Annotated[float, Field(ge=0)] = 1.0
    max_in_flight: PositiveInt = Field(
        default=32,
        description="requests the gateway sends this replica at once; the pool's capacity "
        "is the sum over replicas with a weight above 0, and requests beyond it queue",
    )


class BalancerFile(_Strict):
    """How requests are spread over a pool's replicas (docs/routing.md)."""

    strategy: BalanceStrategy = Field(
        default="least_load",
        description="least_load: fewest tokens queued and decoding per unit of weight; "
        "round_robin: in turn",
    )
    affinity: AffinityMode = Field(
        default="prefix",
        description="prefix: the x-session-id header, else a hash of the prompt's first "
        "prefix_chars characters, picks a preferred replica (rendezvous hashing); "
        "session: the header only; none: no affinity",
    )
    prefix_chars: PositiveInt = 1024
    load_factor: Annotated[float, Field(ge=1, allow_inf_nan=False)] = Field(
        default=1.5,
        description="affinity yields to least load when the preferred replica's load is "
        "over this factor of the average and over load_slack_tokens above the least loaded",
    )
    load_slack_tokens: Annotated[int, Field(ge=0)] = 2048
    max_attempts: PositiveInt = Field(
        default=3,
        description="replicas tried for one request on connect errors and 5xx before "
        "the first byte",
    )


class HealthFile(_Strict):
    """Active probes, load polling and passive ejection of a pool's replicas.

    Probe paths default by pool kind (tollgate: /health and /ready; vllm and
    trtllm: /health and /v1/models; openai: /v1/models only); null turns one off.
    """

    liveness_path: UrlPath | None = None
    readiness_path: UrlPath | None = None
    probe_interval_s: Seconds = 2.0
    probe_timeout_s: Seconds = 2.0
    deep_probe_interval_s: Seconds | None = Field(
        default=None, description="generate one token this often; null: never"
    )
    load_interval_s: Seconds = Field(default=0.5, description="how often load is read")
    failures_to_eject: PositiveInt = Field(
        default=3, description="consecutive failures (requests or probes) that eject a replica"
    )
    successes_to_restore: PositiveInt = Field(
        default=2, description="consecutive successful probes that bring it back"
    )
    ejection_base_s: Seconds = Field(
        default=2.0, description="first ejection's length; doubles for each one in a row"
    )
    ejection_max_s: Seconds = 60.0


class PoolFile(_Strict):
    """A set of interchangeable backend replicas serving the same models."""

    kind: PoolKind
    replicas: list[ReplicaFile] = Field(min_length=1)
    required: bool = Field(
        default=False,
        description="the gateway reports ready (GET /readyz) only while at least one "
        "replica of this pool is healthy",
    )
    timeouts: UpstreamTimeoutsFile = Field(default_factory=UpstreamTimeoutsFile)
    balancer: BalancerFile = Field(default_factory=BalancerFile)
    health: HealthFile = Field(default_factory=HealthFile)

    @model_validator(mode="after")
    def _some_weight(self) -> PoolFile:
        if all(r.weight == 0 for r in self.replicas):
            raise ValueError("at least one replica needs a weight above 0")
        return self


class VersionFile(_Strict):
    """One version of a model (a canary split), served inside the model's pool."""

    name: Name
    upstream_model: Annotated[str, StringConstraints(min_length=1)]
    weight: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(
        description="share of the model's traffic, relative to the other versions"
    )
    replicas: list[Url] | None = Field(
        default=None, description="the pool's replicas that serve it (URLs); default all"
    )


class ModelFile(_Strict):
    """A model the gateway exposes, and where it is served."""

    upstream_model: Annotated[str, StringConstraints(min_length=1)] | None = Field(
        default=None, description="the model name the backend serves (or give versions)"
    )
    versions: list[VersionFile] | None = Field(
        default=None,
        min_length=1,
        description="a weighted split between versions, sticky per x-session-id",
    )
    pool: Name
    tier: ModelTier
    context_length: PositiveInt
    tokenizer: str | None = Field(
        default=None, description="tokenizer for counting prompt tokens; estimated if absent"
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelFile:
        if (self.upstream_model is None) == (self.versions is None):
            raise ValueError("give either upstream_model or versions")
        if self.versions is not None:
            names = [v.name for v in self.versions]
            if len(set(names)) != len(names):
                raise ValueError("two versions share a name")
            if all(v.weight == 0 for v in self.versions):
                raise ValueError("at least one version needs a weight above 0")
        return self


class ClassifierFile(_Strict):
    """The ``auto`` classifier: large when bias + sum(weight * feature) >= threshold."""

    threshold: Finite
    bias: Finite = 0.0
    weights: dict[FeatureName, Finite] = Field(
        default_factory=dict, description="per feature (docs/routing.md); absent: 0"
    )
    long_prompt_tokens: PositiveInt = 1500
    long_output_tokens: PositiveInt = 2048
    many_turns: Annotated[int, Field(gt=1)] = 6


class RoutingFile(_Strict):
    """The model names ``small``, ``large`` and ``auto``, tenant tiers and fallback."""

    tiers: dict[ModelTier, Name] = Field(
        default_factory=dict, description="the concrete model each tier name stands for"
    )
    tenant_tiers: dict[TenantTier, list[ModelTier]] = Field(
        default_factory=dict,
        description="the model tiers each tenant tier may use; absent: all",
    )
    fallback: dict[ModelTier, ModelTier] = Field(
        default_factory=dict,
        description="the tier used when a tier's pool has no healthy replica or its "
        "queue is full; absent: 503",
    )
    auto: ClassifierFile | None = Field(
        default=None, description="the classifier behind the model name auto; absent: no auto"
    )

    @field_validator("fallback")
    @classmethod
    def _other_tier(cls, value: dict[str, str]) -> dict[str, str]:
        for tier, other in value.items():
            if tier == other:
                raise ValueError(f"{tier} cannot fall back to itself")
        return value

    @field_validator("tenant_tiers")
    @classmethod
    def _some_tier(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for tenant_tier, tiers in value.items():
            if not tiers:
                raise ValueError(f"{tenant_tier}: list at least one model tier")
            if len(set(tiers)) != len(tiers):
                raise ValueError(f"{tenant_tier}: a tier is listed twice")
        return value


class PriorityClassFile(_Strict):
    """A queueing class: a saturated pool serves classes in proportion to their
    ``weight`` (in tokens); lower ``priority`` goes first on a tie."""

    priority: Annotated[int, Field(ge=0)]
    max_queue_wait_s: Seconds
    weight: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(
        default=1.0, description="share of a saturated pool, relative to the other classes"
    )
    max_queue_length: PositiveInt = Field(
        default=1000, description="requests of this class that may wait per pool"
    )


class PriceFile(_Strict):
    """Prices per million tokens, in force from ``effective_from`` (UTC day) on."""

    # Not strict: a quoted "2025-01-01" is as clear as an unquoted one.
    effective_from: Annotated[date, Field(strict=False)]
    input_per_million: Money
    output_per_million: Money
    cached_input_per_million: Money | None = Field(
        default=None, description="defaults to input_per_million"
    )


class PolicyDocument(_Strict):
    """The merged top-level keys of every file in ``policies/``."""

    models: dict[Name, ModelFile] = Field(min_length=1)
    pools: dict[Name, PoolFile] = Field(min_length=1)
    priority_classes: dict[Name, PriorityClassFile] = Field(min_length=1)
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")] = "USD"
    prices: dict[Name, list[PriceFile]] = Field(default_factory=dict)
    routing: RoutingFile = Field(default_factory=RoutingFile)

    @field_validator("prices")
    @classmethod
    def _distinct_dates(cls, value: dict[str, list[PriceFile]]) -> dict[str, list[PriceFile]]:
        for model, entries in value.items():
            days = [e.effective_from for e in entries]
            if len(set(days)) != len(days):
                raise ValueError(f"{model}: two prices share an effective_from date")
            if not entries:
                raise ValueError(f"{model}: needs at least one price")
        return value


POLICY_TOP_LEVEL_KEYS: frozenset[str] = frozenset(PolicyDocument.model_fields)
