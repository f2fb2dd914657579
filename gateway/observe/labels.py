"""Label values that stay bounded whatever clients send.

A label value is either a name from the policy (a tenant id, a model or
virtual model name, a pool, a priority class) or one of a few constants: a
client string never becomes a label, so the number of series is bounded by
the policy (request ids, user ids and unknown model names never appear).
"""

from __future__ import annotations

import asyncio

from litestar.exceptions import HTTPException

from gateway.errors import GatewayError
from gateway.policy.compiled import VIRTUAL_MODEL_NAMES, Policy

UNKNOWN_TENANT = "unknown"
"""The tenant of a request refused before its tenant was resolved."""
OTHER_MODEL = "other"
"""The model of a request that named no model of the policy (or none at all)."""
CLIENT_CLOSED = 499
"""The status recorded for a request whose client went away (nginx's 499)."""


def model_label(policy: Policy, requested: object) -> str:
    """``requested`` when the policy knows it (a model, ``small``, ``large``
    or ``auto``), else ``other``."""
    if isinstance(requested, str) and (
        requested in policy.models or requested in VIRTUAL_MODEL_NAMES
    ):
        return requested
    return OTHER_MODEL


def tenant_label(policy: Policy, tenant_id: str | None) -> str:
    """``tenant_id`` when the policy has that tenant, else ``unknown``."""
    if tenant_id is not None and tenant_id in policy.tenants:
        return tenant_id
    return UNKNOWN_TENANT


def status_of(exc: BaseException) -> int:
    """The HTTP status a request ending with ``exc`` gets (as ``gateway.app``'s
    exception handlers answer it); cancellation is a client that left."""
    if isinstance(exc, GatewayError | HTTPException):
        return int(exc.status_code)
    if isinstance(exc, asyncio.CancelledError) or not isinstance(exc, Exception):
        return CLIENT_CLOSED
    return 500
