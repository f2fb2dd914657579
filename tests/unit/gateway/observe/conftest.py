"""The shipped policy, loaded once for the observe unit tests."""

from __future__ import annotations

import pytest

from gateway.policy.compiled import Policy
from gateway.policy.loader import load_policy
from tests.support.processes import REPO


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy(REPO / "tenants", REPO / "policies", environ={})
