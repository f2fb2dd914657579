"""Role checks for endpoints beyond inference (admin, finance)."""

from __future__ import annotations

from gateway.auth.principal import Principal, Role
from gateway.errors import PermissionDeniedError


def require_role(principal: Principal, *roles: Role) -> None:
    """Pass when ``principal`` holds any of ``roles``; raise PermissionDeniedError otherwise.

    Roles do not imply one another: an admin endpoint that finance may also
    use names both roles.
    """
    if not roles:
        raise ValueError("require_role needs at least one role")
    if principal.roles.isdisjoint(roles):
        wanted = " or ".join(sorted(str(Role(r)) for r in roles))
        raise PermissionDeniedError(f"this endpoint requires the {wanted} role")
