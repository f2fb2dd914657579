"""Capability routing, canary versions, retries and health over real HTTP, with
fast fake backends (tests/support/fake_upstream.py) as replicas: one that
answers 500 to everything, one that is not running, and healthy ones."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.settings import GatewaySettings
from tests.conftest import gateway_env
from tests.support.processes import (
    FakeUpstreamProcess,
    GatewayProcess,
    InProcessGateway,
    free_port,
)

FAST_HEALTH = {
    "probe_interval_s": 0.2,
    "probe_timeout_s": 1,
    "load_interval_s": 0.2,
    "failures_to_eject": 2,
    "successes_to_restore": 2,
    "ejection_base_s": 0.5,
    "ejection_max_s": 2,
}
CODE_PROMPT = (
    "Here is my code:\n```python\ndef f(xs):\n    return sum(xs) / len(xs)\n```\nFix the bug."
)


@pytest.fixture(scope="module")
def fakes() -> Iterator[list[FakeUpstreamProcess]]:
    procs = [FakeUpstreamProcess(), FakeUpstreamProcess()]
    for proc in procs:
        proc.start(timeout_s=60)
    try:
        yield procs
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture
def fresh(fakes: list[FakeUpstreamProcess]) -> list[FakeUpstreamProcess]:
    for fake in fakes:
        httpx.post(f"{fake.url}/fake/reset", timeout=5)
    return fakes


def write_policy(
    policy_dirs: tuple[Path, Path],
    pools: dict[str, list[str]],
    *,
    model_pools: dict[str, str] | None = None,
    versions: list[dict[str, Any]] | None = None,
    health: dict[str, Any] | None = None,
) -> None:
    """Pools of the given replica URLs (fast health settings), the two shipped
    models on them, and a tenant `rt` without quota limits."""
    tenants, policies = policy_dirs
    models = yaml.safe_load((policies / "models.yaml").read_text())
    models["pools"] = {
        name: {
            "kind": "tollgate",
            "replicas": [{"url": url, "weight": 1, "max_in_flight": 16} for url in urls],
            "timeouts": {"connect_s": 1, "first_byte_s": 5, "between_chunks_s": 5, "total_s": 30},
            "health": FAST_HEALTH | (health or {}),
        }
        for name, urls in pools.items()
    }
    first = next(iter(pools))
    for name, model in models["models"].items():
        model["pool"] = (model_pools or {}).get(name, first)
    if versions is not None:
        large = models["models"]["smollm2"]
        del large["upstream_model"]
        large["versions"] = versions
    (policies / "models.yaml").write_text(yaml.safe_dump(models, sort_keys=False))
    doc = {
        "id": "rt",
        "display_name": "Routing tests",
        "tier": "standard",
        "allowed_models": ["*"],
        "default_priority": "standard",
        "allowed_priorities": ["standard"],
    }
    (tenants / "rt.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def start_gateway(
    policy_dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> InProcessGateway:
    env = gateway_env("http://127.0.0.1:9", *policy_dirs)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    gateway = InProcessGateway(GatewaySettings.from_env(env))
    gateway.start()
    return gateway


def chat(content: str = "hello", model: str = "smollm2", **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "x_fake": {"completion_tokens": 4},
        **extra,
    }


def post(
    gw: InProcessGateway | GatewayProcess,
    token: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    return httpx.post(
        f"{gw.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {token}", **(headers or {})},
        json=body,
        timeout=30,
    )


def backends(gw: InProcessGateway, admin: str) -> dict[str, dict[str, Any]]:
    response = httpx.get(
        f"{gw.url}/admin/backends", headers={"authorization": f"Bearer {admin}"}, timeout=5
    )
    assert response.status_code == 200, response.text
    return {r["url"]: r for pool in response.json()["pools"] for r in pool["replicas"]}


def completed(fake: FakeUpstreamProcess) -> int:
    return int(httpx.get(f"{fake.url}/fake/counters", timeout=5).json()["requests"])


def wait_for(
    condition: Callable[[], bool], timeout_s: float = 10.0, show: Callable[[], Any] = lambda: None
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {show()}")
        time.sleep(0.05)


def test_model_names_headers_and_the_models_list(
    fresh: list[FakeUpstreamProcess],
    policy_dirs: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    mint: Callable[..., str],
) -> None:
    write_policy(policy_dirs, {"local": [fresh[0].url]})
    gw = start_gateway(policy_dirs, monkeypatch)
    try:
        token, free = mint("rt"), mint("globex")
        hard = post(gw, token, chat(CODE_PROMPT, model="auto"))
        easy = post(gw, token, chat("Hi there!", model="auto"))
        pinned = post(gw, free, chat(CODE_PROMPT, model="auto"))
        tier = post(gw, token, chat(model="small"))
        refused = post(gw, free, chat(model="large"))
        explicit = post(gw, token, chat())
        listed = httpx.get(
            f"{gw.url}/v1/models", headers={"authorization": f"Bearer {free}"}, timeout=5
        ).json()
    finally:
        gw.stop()
    assert hard.status_code == 200, hard.text
    assert hard.headers["x-tollgate-model"] == "smollm2"
    route = hard.headers["x-tollgate-route"]
    assert route.startswith("auto; tier=large; score=") and "code+" in route
    assert easy.headers["x-tollgate-model"] == "smollm2-small"
    assert easy.headers["x-tollgate-route"].startswith("auto; tier=small")
    assert pinned.headers["x-tollgate-model"] == "smollm2-small"
    assert "pinned=free" in pinned.headers["x-tollgate-route"]
    assert tier.headers["x-tollgate-model"] == "smollm2-small"
    assert tier.headers["x-tollgate-route"] == "tier; tier=small"
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "model_not_allowed"
    assert explicit.headers["x-tollgate-route"] == "explicit"
    assert explicit.headers["x-tollgate-model-version"] == "default"
    assert sorted(m["id"] for m in listed["data"]) == ["auto", "small", "smollm2-small"]


def test_canary_versions_are_sticky_per_session_and_named_in_the_response(
    fresh: list[FakeUpstreamProcess],
    policy_dirs: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    mint: Callable[..., str],
) -> None:
    stable, canary = fresh
    versions = [
        {"name": "stable", "upstream_model": "smollm2", "weight": 50},
        {"name": "next", "upstream_model": "smollm2-next", "weight": 50, "replicas": [canary.url]},
    ]
    write_policy(policy_dirs, {"local": [stable.url, canary.url]}, versions=versions)
    gw = start_gateway(policy_dirs, monkeypatch)
    try:
        token = mint("rt")
        served: dict[str, set[str]] = {}
        for i in range(12):
            for _ in range(3):
                response = post(gw, token, chat(), {"x-session-id": f"user-{i}"})
                assert response.status_code == 200, response.text
                version = response.headers["x-tollgate-model-version"]
                served.setdefault(f"user-{i}", set()).add(version)
                # The backend was asked for that version's upstream model.
                expected = "smollm2-next" if version == "next" else "smollm2"
                assert response.json()["model"] == expected
    finally:
        gw.stop()
    assert all(len(versions) == 1 for versions in served.values()), served
    assert {v for versions in served.values() for v in versions} == {"stable", "next"}
    # Only the canary's replica serves the canary version.
    nexts = sum(3 for versions in served.values() if versions == {"next"})
    assert completed(canary) >= nexts


def test_a_failing_replica_is_retried_ejected_and_restored(
    fresh: list[FakeUpstreamProcess],
    policy_dirs: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    mint: Callable[..., str],
) -> None:
    good = fresh[0]
    bad = FakeUpstreamProcess("--status", "500")
    bad.start(timeout_s=60)
    # Ejected long enough to watch it stay out (it passes its probes).
    write_policy(
        policy_dirs,
        {"local": [bad.url, good.url]},
        health={"ejection_base_s": 5, "ejection_max_s": 10},
    )
    gw = start_gateway(policy_dirs, monkeypatch)
    admin = mint("rt", roles=["admin"])
    try:
        token = mint("rt")
        # Every request succeeds: a 500 before the first byte is retried on the
        # other replica (round the two, with several requests per replica).
        statuses = [post(gw, token, chat(), {"x-session-id": f"s{i}"}) for i in range(12)]
        assert [r.status_code for r in statuses] == [200] * 12
        wait_for(lambda: backends(gw, admin)[bad.url]["status"] == "ejected")
        state = backends(gw, admin)
        assert state[bad.url]["num_failures"] >= 2 and state[bad.url]["num_ejections"] >= 1
        assert state[good.url]["status"] == "healthy"
        # Ejected: nothing more is sent to it.
        before = completed(bad)
        for i in range(10):
            assert post(gw, token, chat(), {"x-session-id": f"t{i}"}).status_code == 200
        assert completed(bad) == before
        metrics = httpx.get(f"{gw.url}/metrics", timeout=5).text
        assert f'tollgate_replica_healthy{{pool="local",replica="{bad.url}"}} 0' in metrics
        # Fixed: the probes bring it back, and it takes requests again.
        bad.stop()
        bad.argv = ["tests.support.fake_upstream"]
        bad.start(timeout_s=60)
        wait_for(
            lambda: backends(gw, admin)[bad.url]["status"] == "healthy",
            show=lambda: backends(gw, admin)[bad.url],
        )
        for i in range(10):
            assert post(gw, token, chat(), {"x-session-id": f"u{i}"}).status_code == 200
        assert completed(bad) > 0
    finally:
        gw.stop()
        bad.stop()


def test_no_healthy_replica_falls_back_to_the_other_tier_or_503(
    fresh: list[FakeUpstreamProcess],
    policy_dirs: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    mint: Callable[..., str],
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    write_policy(
        policy_dirs,
        {"big": [dead], "local": [fresh[0].url]},
        model_pools={"smollm2": "big", "smollm2-small": "local"},
    )
    gw = start_gateway(policy_dirs, monkeypatch)
    admin = mint("rt", roles=["admin"])
    try:
        token = mint("rt")
        wait_for(lambda: backends(gw, admin)[dead]["status"] == "ejected")
        fell_back = post(gw, token, chat(CODE_PROMPT, model="auto"))
        large = post(gw, token, chat(model="large"))
        named = post(gw, token, chat(model="smollm2"))
    finally:
        gw.stop()
    assert fell_back.status_code == 200, fell_back.text
    assert fell_back.headers["x-tollgate-model"] == "smollm2-small"
    assert "fallback=large:no_healthy_replica" in fell_back.headers["x-tollgate-route"]
    assert large.headers["x-tollgate-model"] == "smollm2-small"
    # A named model is never replaced: 503 with Retry-After.
    assert named.status_code == 503
    assert named.json()["error"]["code"] == "no_healthy_replica"
    assert int(named.headers["retry-after"]) >= 1


def test_the_request_log_line_explains_the_route(
    fresh: list[FakeUpstreamProcess], policy_dirs: tuple[Path, Path], mint: Callable[..., str]
) -> None:
    write_policy(policy_dirs, {"local": [fresh[0].url]})
    gw = GatewayProcess(gateway_env(fresh[0].url, *policy_dirs))
    gw.start(timeout_s=60)
    try:
        response = post(gw, mint("rt"), chat(CODE_PROMPT, model="auto"))
        assert response.status_code == 200, response.text
    finally:
        gw.stop()
    records = [json.loads(line) for line in gw.logs().splitlines() if line.startswith("{")]
    (record,) = [r for r in records if r.get("event") == "request"]
    assert record["model"] == "smollm2" and record["model_requested"] == "auto"
    assert record["route"] == "auto" and record["tier"] == "large"
    assert record["route_score"] >= 0.45 and "code" in record["route_reasons"]
    assert record["attempts"] == 1 and record["model_version"] == "default"
    assert "def f" not in gw.logs()


def test_deep_probes_generate_a_token_on_every_replica(
    fresh: list[FakeUpstreamProcess],
    policy_dirs: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    mint: Callable[..., str],
) -> None:
    write_policy(
        policy_dirs,
        {"local": [f.url for f in fresh]},
        health={"deep_probe_interval_s": 0.2, "probe_interval_s": 5},
    )
    gw = start_gateway(policy_dirs, monkeypatch)
    admin = mint("rt", roles=["admin"])
    try:
        # No traffic: the only completions the replicas see are deep probes.
        wait_for(lambda: all(completed(f) >= 2 for f in fresh))
        wait_for(
            lambda: all(r["last_probe_detail"] == "deep ok" for r in backends(gw, admin).values())
        )
    finally:
        gw.stop()
