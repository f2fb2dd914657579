"""GET /readyz over real HTTP: ready only with a policy, a quota store that
answers, and a healthy replica in every required pool; a 503 names what failed."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import StartGateway, gateway_env
from tests.support.processes import FakeUpstreamProcess, InProcessGateway, RedisServer, free_port
from tests.support.prometheus import scrape


def use_replica(policies: Path, url: str, **health: Any) -> None:
    """The shipped `local` pool (required: true), on `url`, with fast probes."""
    models = yaml.safe_load((policies / "models.yaml").read_text())
    pool = models["pools"]["local"]
    assert pool["required"] is True
    pool["replicas"] = [{"url": url, "weight": 1}]
    pool["health"].update(
        {"probe_interval_s": 0.2, "failures_to_eject": 2, "ejection_base_s": 1, **health}
    )
    (policies / "models.yaml").write_text(yaml.safe_dump(models, sort_keys=False))


def readyz(gw: InProcessGateway) -> tuple[int, dict[str, Any]]:
    response = httpx.get(f"{gw.url}/readyz", timeout=10)
    return response.status_code, response.json()


def wait_for_status(gw: InProcessGateway, status: int, timeout_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        code, body = readyz(gw)
        if code == status:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"/readyz stayed {code}: {body}")
        time.sleep(0.1)


def test_ready_with_a_healthy_required_pool_and_503_naming_it_when_down(
    policy_dirs: tuple[Path, Path], start_gateway: StartGateway
) -> None:
    tenants, policies = policy_dirs
    fake = FakeUpstreamProcess()
    fake.start(timeout_s=60)
    try:
        use_replica(policies, fake.url)
        gw = start_gateway(gateway_env(fake.url, tenants, policies))
        body = wait_for_status(gw, 200)
        assert body["ready"] is True and body["failed"] == []
        checks = {c["name"]: c["ok"] for c in body["checks"]}
        assert checks == {"policy": True, "quota_store": True, "pool:local": True}
        assert httpx.get(f"{gw.url}/healthz", timeout=5).status_code == 200
        # Its only replica goes away: ejected after two failed probes.
        fake.stop()
        body = wait_for_status(gw, 503)
        assert body["ready"] is False and body["failed"] == ["pool:local"]
        failed = next(c for c in body["checks"] if c["name"] == "pool:local")
        assert "no healthy replica" in failed["detail"]
        # Liveness is not readiness: the process still serves.
        assert httpx.get(f"{gw.url}/healthz", timeout=5).status_code == 200
    finally:
        fake.stop()


def test_not_ready_before_a_required_replica_was_ever_seen_up(
    policy_dirs: tuple[Path, Path], start_gateway: StartGateway
) -> None:
    tenants, policies = policy_dirs
    dead = f"http://127.0.0.1:{free_port()}"
    use_replica(policies, dead)
    gw = start_gateway(gateway_env(dead, tenants, policies))
    code, body = readyz(gw)
    assert code == 503 and body["failed"] == ["pool:local"]


def test_a_pool_not_marked_required_does_not_gate_readiness(
    policy_dirs: tuple[Path, Path], start_gateway: StartGateway
) -> None:
    tenants, policies = policy_dirs
    dead = f"http://127.0.0.1:{free_port()}"
    use_replica(policies, dead)
    models = yaml.safe_load((policies / "models.yaml").read_text())
    models["pools"]["local"]["required"] = False
    (policies / "models.yaml").write_text(yaml.safe_dump(models, sort_keys=False))
    gw = start_gateway(gateway_env(dead, tenants, policies))
    code, body = readyz(gw)
    assert code == 200, body
    assert [c["name"] for c in body["checks"]] == ["policy", "quota_store"]


def test_503_naming_the_quota_store_while_redis_is_down(
    redis_server: RedisServer,
    fake_upstream: FakeUpstreamProcess,
    policy_dirs: tuple[Path, Path],
    start_gateway: StartGateway,
    mint: Callable[..., str],
) -> None:
    tenants, policies = policy_dirs
    use_replica(policies, fake_upstream.url)
    env = {
        **gateway_env(fake_upstream.url, tenants, policies),
        "TOLLGATE_STORE": "redis",
        "TOLLGATE_REDIS_URL": redis_server.url,
        "TOLLGATE_REDIS_TIMEOUT_S": "0.5",
    }
    gw = start_gateway(env)
    wait_for_status(gw, 200)
    assert scrape(gw.url).get("tollgate_quota_store_up") == 1
    redis_server.stop()
    body = wait_for_status(gw, 503)
    assert body["failed"] == ["quota_store"]
    store = next(c for c in body["checks"] if c["name"] == "quota_store")
    assert "quota store" in store["detail"]
    m = scrape(gw.url)
    assert m.get("tollgate_quota_store_up") == 0
    # Pings from probes and scrapes count as failures: the breaker opens once.
    for _ in range(3):
        readyz(gw)
    assert scrape(gw.url).get("tollgate_quota_store_breaker_trips_total") == 1
    # Back: the breaker's probe closes it, and the gateway is ready again.
    redis_server.start()
    wait_for_status(gw, 200)
    assert scrape(gw.url).get("tollgate_quota_store_up") == 1
