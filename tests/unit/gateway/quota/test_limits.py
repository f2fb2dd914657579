"""Which scopes and per-request limits apply, from the compiled policy."""

from __future__ import annotations

from pathlib import Path

from gateway.policy.loader import load_policy
from gateway.quota.limits import request_limits, scopes_for, tenant_prefix
from tests.support.processes import REPO


def acme():  # type: ignore[no-untyped-def]
    policy = load_policy(REPO / "tenants", REPO / "policies", environ={})
    tenant = policy.tenant("acme")
    assert tenant is not None
    return tenant


def test_the_shipped_acme_tenant() -> None:
    tenant = acme()
    scopes = scopes_for(tenant, "nightly-summaries", "smollm2")
    assert [s.key for s in scopes] == [
        "tollgate:q:{acme}:t",
        "tollgate:q:{acme}:t|m|smollm2",
        "tollgate:q:{acme}:a|nightly-summaries",
        "tollgate:q:{acme}:a|nightly-summaries|m|smollm2",
    ]
    base, model, app, app_model = scopes
    assert (base.tokens_per_minute, base.max_concurrent, base.time_zone) == (
        200000,
        32,
        "America/New_York",
    )
    # The override is a budget of its own: it sets only what it names.
    assert (model.tokens_per_minute, model.max_concurrent, model.requests_per_minute) == (
        100000,
        16,
        None,
    )
    assert (app.tokens_per_day, app.time_zone) == (10000000, "America/New_York")
    assert app_model.tokens_per_minute == 50000
    assert all(s.key.startswith(tenant_prefix("acme")) for s in scopes)


def test_unknown_apps_and_unlimited_levels_add_no_scope() -> None:
    tenant = acme()
    assert [s.key for s in scopes_for(tenant, "web", "smollm2-small")] == ["tollgate:q:{acme}:t"]
    assert len(scopes_for(tenant, None, "smollm2")) == 2


def test_request_limits_take_the_smallest_level(tmp_path: Path) -> None:
    tenant = acme()
    limits = request_limits(tenant, "support-bot", "smollm2")
    assert (limits.max_prompt_tokens, limits.max_output_tokens) == (6144, 2048)
