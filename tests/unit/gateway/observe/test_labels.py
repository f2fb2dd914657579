"""Label values stay bounded by the policy whatever a client sends."""

from __future__ import annotations

import asyncio

import pytest
from litestar.exceptions import HTTPException

from gateway.errors import (
    AuthenticationError,
    ClientClosedRequestError,
    RateLimitError,
    UpstreamError,
)
from gateway.observe.labels import (
    CLIENT_CLOSED,
    OTHER_MODEL,
    UNKNOWN_TENANT,
    model_label,
    status_of,
    tenant_label,
)
from gateway.policy.compiled import Policy


@pytest.mark.parametrize("name", ["smollm2", "smollm2-small", "small", "large", "auto"])
def test_policy_models_and_virtual_names_are_kept(policy: Policy, name: str) -> None:
    assert model_label(policy, name) == name


@pytest.mark.parametrize(
    "name", ["gpt-4o", "SMOLLM2", "smollm2 ", "", "x" * 10_000, None, 42, ["smollm2"]]
)
def test_anything_else_is_other(policy: Policy, name: object) -> None:
    assert model_label(policy, name) == OTHER_MODEL


def test_tenants_outside_the_policy_are_unknown(policy: Policy) -> None:
    assert tenant_label(policy, "acme") == "acme"
    assert tenant_label(policy, "evil-corp") == UNKNOWN_TENANT
    assert tenant_label(policy, None) == UNKNOWN_TENANT


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (AuthenticationError("no"), 401),
        (RateLimitError("slow down", retry_after_s=1), 429),
        (UpstreamError("broke"), 502),
        (ClientClosedRequestError("gone"), 499),
        (HTTPException(status_code=413, detail="too big"), 413),
        (ValueError("bug"), 500),
        (asyncio.CancelledError(), CLIENT_CLOSED),
    ],
)
def test_status_of_matches_the_exception_handlers(exc: BaseException, status: int) -> None:
    assert status_of(exc) == status
