"""Who is calling: the verified identity a request carries after authentication."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    """What a caller may do beyond inference (``user``)."""

    USER = "user"
    ADMIN = "admin"
    FINANCE = "finance"


@dataclass(frozen=True, slots=True)
class Principal:
    """The verified caller: tenant, optional app and subject, roles, token id."""

    tenant_id: str
    app_id: str | None = None
    subject: str | None = None
    roles: frozenset[Role] = frozenset({Role.USER})
    token_id: str | None = None

    def has_role(self, role: Role) -> bool:
        """Whether the caller holds ``role``."""
        return role in self.roles
