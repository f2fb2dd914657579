"""Where the policy meets the caller: the tenant a principal may act for."""

from __future__ import annotations

from gateway.auth.principal import Principal
from gateway.errors import AuthenticationError, PermissionDeniedError
from gateway.policy.compiled import Policy, TenantPolicy


def resolve_tenant(policy: Policy, principal: Principal) -> TenantPolicy:
    """The principal's tenant in ``policy``.

    An unknown tenant is an authentication failure (401 ``unknown_tenant``):
    the token was signed for a tenant this gateway does not serve. A disabled
    tenant is known but refused (403 ``tenant_disabled``).
    """
    tenant = policy.tenant(principal.tenant_id)
    if tenant is None:
        raise AuthenticationError("the token's tenant is not known here", code="unknown_tenant")
    if not tenant.enabled:
        raise PermissionDeniedError("this tenant is disabled", code="tenant_disabled")
    return tenant
