"""Which limits apply to one request, as pure data: a `Reservation`.

A request for model M by app A of tenant T is charged against up to four
*scopes*, and must fit every one of them (all or nothing):

- the tenant (`limits:` in the tenant file), counted across all its models;
- the tenant for model M, when `limits.model_overrides.M` sets a counted
  limit: an extra budget for M alone, inside the tenant's;
- the app (`apps.A.limits`), counted across all models of that app;
- the app for model M (`apps.A.limits.model_overrides.M`).

Counted limits are `requests_per_minute`, `tokens_per_minute`,
`max_concurrent`, `tokens_per_day` and `tokens_per_month`. A model override
adds a budget for that model instead of loosening the level's own: the
tenant's limit stays the bound on the tenant's whole spend, so per-model
budgets can never add up to more than what the tenant pays for. Per-request
limits (`max_prompt_tokens`, `max_output_tokens`) are replaced by a model
override, and the app's and the tenant's both apply (the smaller wins).

Keys: every key of one tenant starts `tollgate:q:{<tenant>}:`; the braces are
a Redis Cluster hash tag, so all keys one admit touches (app keys included)
live in one slot. App and model names may contain `:` but never `|`, so the
`|` separators below cannot be forged by a name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from gateway.ids import new_id
from gateway.policy.compiled import Limits, TenantPolicy
from gateway.usage.record import UsageEntry

KEY_PREFIX = "tollgate:q:"
WINDOW_S = 60.0
"""Length of the sliding window behind requests_per_minute and tokens_per_minute."""

COUNTED = (
    "requests_per_minute",
    "tokens_per_minute",
    "max_concurrent",
    "tokens_per_day",
    "tokens_per_month",
)
"""The limit kinds a store counts, in the order stores report them."""

BUDGETS = frozenset({"tokens_per_day", "tokens_per_month"})
"""Kinds whose exhaustion is `insufficient_quota` rather than a rate limit."""


@dataclass(frozen=True, slots=True)
class Scope:
    """One set of counters a request is charged against, and its limits."""

    label: str
    """For messages: `tenant 'acme'`, `app 'bot' of tenant 'acme' for model 'm'`."""
    key: str
    """Key prefix of this scope's counters (inside the tenant's hash tag)."""
    time_zone: str
    """IANA zone where this scope's days and months start."""
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None

    def limit(self, kind: str) -> int | None:
        """The limit of `kind` (one of `COUNTED`), or None when not enforced."""
        value: int | None = getattr(self, kind)
        return value

    @property
    def enforces_anything(self) -> bool:
        """Whether any counted limit is set."""
        return any(self.limit(kind) is not None for kind in COUNTED)


@dataclass(frozen=True, slots=True)
class Reservation:
    """What one admit asks a store for: `tokens` against every scope, plus one
    request (RPM) and one concurrency slot, under a fresh `lease_id`."""

    tenant_id: str
    lease_id: str
    tokens: int
    scopes: tuple[Scope, ...]
    usage: UsageEntry | None = None
    """The request's open usage record (status `interrupted`): the store keeps
    it with the lease and appends it, closed, if the lease expires."""


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Per-request ceilings: the smaller of the tenant's and the app's, per model."""

    max_prompt_tokens: int | None
    max_output_tokens: int | None


R = TypeVar("R")


class _PerTenantMemo(Generic[R]):
    """Remembers ``fn(tenant, app_id, model)``, a pure function of a compiled
    (immutable) tenant: every request of a tenant would otherwise rebuild the
    same scopes and ceilings (about 3% of the gateway's CPU per request).

    Keyed by the tenant object's identity, so a policy reload (new objects)
    is never served stale results; an entry keeps its tenant alive, so an
    id is never reused while cached. Bounded: cleared when full.
    """

    __slots__ = ("_entries", "_fn", "_max_entries")

    def __init__(
        self, fn: Callable[[TenantPolicy, str | None, str], R], max_entries: int = 4096
    ) -> None:
        self._fn = fn
        self._max_entries = max_entries
        self._entries: dict[tuple[int, str | None, str], tuple[TenantPolicy, R]] = {}

    def __call__(self, tenant: TenantPolicy, app_id: str | None, model: str) -> R:
        key = (id(tenant), app_id, model)
        found = self._entries.get(key)
        if found is not None and found[0] is tenant:
            return found[1]
        if len(self._entries) >= self._max_entries:
            self._entries.clear()
        result = self._fn(tenant, app_id, model)
        self._entries[key] = (tenant, result)
        return result


def tenant_prefix(tenant_id: str) -> str:
    """`tollgate:q:{tenant}:`: the prefix (and Cluster hash tag) of a tenant's keys."""
    return f"{KEY_PREFIX}{{{tenant_id}}}:"


def _counted_only(limits: Limits) -> dict[str, int | None]:
    return {kind: getattr(limits, kind) for kind in COUNTED}


def _zone(*candidates: str | None) -> str:
    for zone in candidates:
        if zone:
            return zone
    return "UTC"


def scopes_for(tenant: TenantPolicy, app_id: str | None, model: str) -> tuple[Scope, ...]:
    """The scopes a request for `model` by `app_id` is charged against.

    Scopes without any counted limit are left out, so a tenant without limits
    costs the store nothing. Remembered per tenant object (`_PerTenantMemo`).
    """
    return _scopes_memo(tenant, app_id, model)


def _scopes(tenant: TenantPolicy, app_id: str | None, model: str) -> tuple[Scope, ...]:
    prefix = tenant_prefix(tenant.tenant_id)
    tenant_zone = _zone(tenant.limits.base.time_zone)
    found: list[Scope] = []

    def add(label: str, key: str, limits: Limits, zone: str) -> None:
        scope = Scope(label=label, key=key, time_zone=zone, **_counted_only(limits))
        if scope.enforces_anything:
            found.append(scope)

    who = f"tenant '{tenant.tenant_id}'"
    add(who, prefix + "t", tenant.limits.base, tenant_zone)
    override = tenant.limits.model_overrides.get(model)
    if override is not None:
        add(
            f"{who} for model '{model}'",
            f"{prefix}t|m|{model}",
            override,
            _zone(override.time_zone, tenant_zone),
        )
    app = tenant.apps.get(app_id) if app_id is not None else None
    if app is not None:
        app_zone = _zone(app.limits.base.time_zone, tenant_zone)
        app_who = f"app '{app.app_id}' of {who}"
        add(app_who, f"{prefix}a|{app.app_id}", app.limits.base, app_zone)
        app_override = app.limits.model_overrides.get(model)
        if app_override is not None:
            add(
                f"{app_who} for model '{model}'",
                f"{prefix}a|{app.app_id}|m|{model}",
                app_override,
                _zone(app_override.time_zone, app_zone),
            )
    return tuple(found)


def request_limits(tenant: TenantPolicy, app_id: str | None, model: str) -> RequestLimits:
    """Per-request ceilings for `model`: overrides replace, app and tenant both
    apply. Remembered per tenant object (`_PerTenantMemo`)."""
    return _request_limits_memo(tenant, app_id, model)


def _request_limits(tenant: TenantPolicy, app_id: str | None, model: str) -> RequestLimits:
    levels = [tenant.limits.for_model(model)]
    app_level = tenant.app_limits(app_id, model)
    if app_level is not None:
        levels.append(app_level)

    def smallest(name: str) -> int | None:
        values = [v for v in (getattr(level, name) for level in levels) if v is not None]
        return min(values) if values else None

    return RequestLimits(smallest("max_prompt_tokens"), smallest("max_output_tokens"))


_scopes_memo = _PerTenantMemo(_scopes)
_request_limits_memo = _PerTenantMemo(_request_limits)


def reservation_for(
    tenant: TenantPolicy,
    app_id: str | None,
    model: str,
    tokens: int,
    *,
    lease_id: str | None = None,
    usage: UsageEntry | None = None,
) -> Reservation:
    """A reservation of `tokens` (prompt + max_tokens) for one request."""
    return Reservation(
        tenant_id=tenant.tenant_id,
        lease_id=lease_id or new_id(),
        tokens=tokens,
        scopes=scopes_for(tenant, app_id, model),
        usage=usage,
    )
