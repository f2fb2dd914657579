"""Model resolution (explicit, tiers, auto, tenant tiers, fallback) and canary
versions, as pure functions of a policy and an availability table."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.errors import NotFoundError, PermissionDeniedError, ServiceUnavailableError
from gateway.policy.compiled import (
    ClassifierConfig,
    LimitSet,
    ModelRoute,
    ModelVersion,
    Policy,
    Pool,
    Pricing,
    Replica,
    RoutingPolicy,
    TenantPolicy,
    UpstreamTimeouts,
)
from gateway.routing.canary import choose_version
from gateway.routing.resolve import (
    RouteDecision,
    Unavailable,
    resolve_route,
    virtual_models_for,
)

TIMEOUTS = UpstreamTimeouts(1, 1, 1, 1)
SMALL_POOL = Pool("small-pool", "tollgate", (Replica("http://s:1", 1),), TIMEOUTS)
LARGE_POOL = Pool("large-pool", "tollgate", (Replica("http://l:1", 1),), TIMEOUTS)
SMALL = ModelRoute("mini", "mini-v1", "small", 4096, SMALL_POOL)
LARGE = ModelRoute(
    "maxi",
    "maxi-v1",
    "large",
    4096,
    LARGE_POOL,
    versions=(ModelVersion("stable", "maxi-v1", 90), ModelVersion("next", "maxi-v2", 10)),
)
AUTO = ClassifierConfig(threshold=0.5, weights={"code": 1.0, "simple_task": -0.5})


def tenant(tid: str, tier: str = "standard", models: tuple[str, ...] = ()) -> TenantPolicy:
    return TenantPolicy(
        tenant_id=tid,
        display_name=tid,
        tier=tier,  # type: ignore[arg-type]
        enabled=True,
        all_models=not models,
        allowed_models=frozenset(models),
        default_priority="standard",
        allowed_priorities=("standard",),
        limits=LimitSet(),
        on_store_failure="fail_closed",
        apps={},
    )


def policy(**routing: Any) -> Policy:
    defaults: dict[str, Any] = {
        "tiers": {"small": "mini", "large": "maxi"},
        "tenant_tiers": {"free": ("small",)},
        "fallback": {"large": "small", "small": "large"},
        "auto": AUTO,
    }
    return Policy(
        version="v",
        loaded_at=datetime.now(UTC),
        tenants={},
        models={"mini": SMALL, "maxi": LARGE},
        pools={"small-pool": SMALL_POOL, "large-pool": LARGE_POOL},
        priority_classes={},
        pricing=Pricing("USD", {}),
        routing=RoutingPolicy(**(defaults | routing)),
    )


STANDARD = tenant("acme")
FREE = tenant("globex", "free")
CODE = {"messages": [{"role": "user", "content": "```python\nx = 1\n```\nfix this bug"}]}
HELLO = {"messages": [{"role": "user", "content": "hello!"}]}


def resolve(
    requested: str,
    body: dict[str, Any] = HELLO,
    *,
    who: TenantPolicy = STANDARD,
    down: dict[str, str] | None = None,
    pol: Policy | None = None,
    key: str = "req-1",
) -> RouteDecision:
    down = down or {}

    def availability(route: ModelRoute, version: ModelVersion) -> Unavailable | None:
        reason = down.get(route.pool.name)
        return Unavailable(reason, 7.0) if reason else None  # type: ignore[arg-type]

    return resolve_route(
        pol or policy(), who, requested, body, "chat", version_key=key, availability=availability
    )


@pytest.mark.parametrize(
    ("requested", "body", "who", "model", "kind", "header_start"),
    [
        ("mini", HELLO, STANDARD, "mini", "explicit", "explicit"),
        ("maxi", CODE, STANDARD, "maxi", "explicit", "explicit"),
        ("small", CODE, STANDARD, "mini", "tier", "tier; tier=small"),
        ("large", HELLO, STANDARD, "maxi", "tier", "tier; tier=large"),
        ("auto", CODE, STANDARD, "maxi", "auto", "auto; tier=large; score=1.000; reasons=code+"),
        ("auto", HELLO, STANDARD, "mini", "auto", "auto; tier=small; score=-0.250"),
        # a free tenant is pinned to small whatever the classifier says
        ("auto", CODE, FREE, "mini", "auto", "auto; tier=small; score=1.000"),
        ("small", HELLO, FREE, "mini", "tier", "tier; tier=small"),
    ],
)
def test_resolution(
    requested: str,
    body: dict[str, Any],
    who: TenantPolicy,
    model: str,
    kind: str,
    header_start: str,
) -> None:
    decision = resolve(requested, body, who=who)
    assert (decision.route.name, decision.kind) == (model, kind)
    assert decision.header().startswith(header_start)


def test_pinning_is_explained() -> None:
    decision = resolve("auto", CODE, who=FREE)
    assert decision.pinned_by == "free" and decision.classification is not None
    assert decision.classification.tier == "large"
    assert "pinned=free" in decision.header()
    assert decision.log_fields()["route_pinned_by"] == "free"


@pytest.mark.parametrize(
    ("requested", "who", "pol", "error"),
    [
        ("gpt-9", STANDARD, None, NotFoundError),
        ("large", FREE, None, PermissionDeniedError),
        ("maxi", FREE, None, PermissionDeniedError),  # the tier rule covers named models too
        ("mini", tenant("t", models=("maxi",)), None, PermissionDeniedError),
        ("auto", STANDARD, policy(auto=None), NotFoundError),
        ("small", STANDARD, policy(tiers={"large": "maxi"}), NotFoundError),
        ("auto", tenant("t", models=("other",)), None, PermissionDeniedError),
    ],
)
def test_refusals(requested: str, who: TenantPolicy, pol: Policy | None, error: type) -> None:
    with pytest.raises(error):
        resolve(requested, who=who, pol=pol)


def test_virtual_model_names_follow_the_tenant() -> None:
    assert virtual_models_for(policy(), STANDARD) == ["small", "large", "auto"]
    assert virtual_models_for(policy(), FREE) == ["small", "auto"]
    assert virtual_models_for(policy(auto=None), STANDARD) == ["small", "large"]
    assert virtual_models_for(policy(tiers={}), STANDARD) == []


@pytest.mark.parametrize(
    ("requested", "body", "down", "model", "fallback"),
    [
        ("auto", CODE, {"large-pool": "no_healthy_replica"}, "mini", "large:no_healthy_replica"),
        ("auto", CODE, {"large-pool": "queue_full"}, "mini", "large:queue_full"),
        ("large", HELLO, {"large-pool": "queue_full"}, "mini", "large:queue_full"),
        ("small", HELLO, {"small-pool": "no_healthy_replica"}, "maxi", "small:no_healthy_replica"),
        ("auto", HELLO, {"large-pool": "no_healthy_replica"}, "mini", None),  # not needed
    ],
)
def test_fallback_to_the_other_tier(
    requested: str, body: dict[str, Any], down: dict[str, str], model: str, fallback: str | None
) -> None:
    decision = resolve(requested, body, down=down)
    assert decision.route.name == model
    if fallback is None:
        assert decision.fallback_from is None
    else:
        assert f"fallback={fallback}" in decision.header()
        assert decision.log_fields()["route_fallback_from"] == fallback.split(":")[0]


def test_no_healthy_replica_and_no_fallback_is_a_503_with_retry_after() -> None:
    with pytest.raises(ServiceUnavailableError) as raised:
        resolve("auto", CODE, down={"large-pool": "no_healthy_replica"}, pol=policy(fallback={}))
    assert raised.value.code == "no_healthy_replica"
    assert raised.value.headers["retry-after"] == "7"
    # both tiers down
    both = {"large-pool": "no_healthy_replica", "small-pool": "no_healthy_replica"}
    with pytest.raises(ServiceUnavailableError):
        resolve("auto", CODE, down=both)


def test_a_free_tenant_never_falls_back_to_large() -> None:
    with pytest.raises(ServiceUnavailableError):
        resolve("auto", HELLO, who=FREE, down={"small-pool": "no_healthy_replica"})


def test_a_full_queue_without_fallback_is_left_to_the_queue() -> None:
    decision = resolve("auto", CODE, down={"large-pool": "queue_full"}, pol=policy(fallback={}))
    assert decision.route.name == "maxi" and decision.fallback_from is None


def test_named_models_never_fall_back() -> None:
    with pytest.raises(ServiceUnavailableError):
        resolve("maxi", down={"large-pool": "no_healthy_replica"})
    assert resolve("maxi", down={"large-pool": "queue_full"}).route.name == "maxi"


def test_canary_split_is_weighted_and_sticky() -> None:
    versions = LARGE.served_versions
    served = Counter(choose_version(versions, "maxi", f"session-{i}").name for i in range(4000))
    assert 0.07 <= served["next"] / 4000 <= 0.13, served
    for i in range(50):
        key = f"session-{i}"
        first = choose_version(versions, "maxi", key)
        assert all(choose_version(versions, "maxi", key) == first for _ in range(3))


def test_raising_a_canary_moves_sessions_only_towards_it() -> None:
    before = (ModelVersion("stable", "a", 95), ModelVersion("next", "b", 5))
    after = (ModelVersion("stable", "a", 80), ModelVersion("next", "b", 20))
    for i in range(2000):
        key = f"s{i}"
        if choose_version(before, "m", key).name == "next":
            assert choose_version(after, "m", key).name == "next"


def test_a_version_with_no_weight_gets_nothing() -> None:
    versions = (ModelVersion("stable", "a", 1), ModelVersion("off", "b", 0))
    assert {choose_version(versions, "m", f"k{i}").name for i in range(500)} == {"stable"}


def test_the_served_version_is_in_the_decision() -> None:
    decision = resolve("maxi", key="session-7")
    assert decision.version.name in ("stable", "next")
    fields = decision.log_fields()
    assert fields["model_version"] == decision.version.name
    assert fields["upstream_model"] == decision.version.upstream_model
    assert resolve("mini").version.name == "default"
    assert resolve("mini").version.upstream_model == "mini-v1"
