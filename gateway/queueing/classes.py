"""A request's priority class: a pure function of the policy and a header."""

from __future__ import annotations

from gateway.errors import BadRequestError, PermissionDeniedError
from gateway.policy.compiled import Policy, PriorityClass, TenantPolicy

PRIORITY_HEADER = "x-priority"


def resolve_priority(policy: Policy, tenant: TenantPolicy, requested: str | None) -> PriorityClass:
    """The class a request runs in: ``requested`` (the ``x-priority`` header)
    when given, else the tenant's default.

    400 ``unknown_priority`` for a class the policy does not define, 403
    ``priority_not_allowed`` for one the tenant may not use.
    """
    name = requested.strip() if requested else ""
    if not name:
        name = tenant.default_priority
    cls = policy.priority_classes.get(name)
    if cls is None:
        known = ", ".join(sorted(policy.priority_classes))
        raise BadRequestError(
            f"the {PRIORITY_HEADER} header names an unknown priority class {name!r} "
            f"(known: {known})",
            code="unknown_priority",
        )
    if name not in tenant.allowed_priorities:
        allowed = ", ".join(tenant.allowed_priorities)
        raise PermissionDeniedError(
            f"tenant '{tenant.tenant_id}' may not use the priority class {name!r} "
            f"(allowed: {allowed})",
            code="priority_not_allowed",
        )
    return cls
