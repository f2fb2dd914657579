"""deploy/compose.yaml, its Prometheus and Grafana files: validated against the
Compose Specification's JSON schema (as vendored by the check-jsonschema
package) and checked against each other and the images."""

from __future__ import annotations

import importlib.resources
import itertools
import json
import re
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from gateway.policy.loader import expand_env, load_policy
from tests.deploy.support import DEPLOY, REPO, Dockerfile, load_yaml

COMPOSE_FILE = DEPLOY / "compose.yaml"
GATEWAYS = ("gateway-1", "gateway-2")
BACKENDS = ("backend-1", "backend-2")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    # YAML anchors and merge keys (<<) resolve here as in Compose.
    return load_yaml(COMPOSE_FILE)  # type: ignore[no-any-return]


def compose_schema() -> dict[str, Any]:
    """The Compose Specification schema (compose-spec/compose-spec,
    schema/compose-spec.json) that check-jsonschema ships for its
    check-compose-spec hook."""
    files = importlib.resources.files("check_jsonschema")
    text = files.joinpath("builtin_schemas/vendor/compose-spec.json").read_text("utf-8")
    return json.loads(text)  # type: ignore[no-any-return]


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]  # type: ignore[no-any-return]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def binds(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Container path -> (source, mode) for short-syntax volumes."""
    out = {}
    for entry in service.get("volumes", []):
        source, target, *rest = entry.split(":")
        out[target] = (source, rest[0] if rest else "rw")
    return out


def image_env(service: dict[str, Any]) -> dict[str, str]:
    df = Dockerfile.read(REPO / service["build"]["dockerfile"])
    return df.env(df.final)


def test_validates_against_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = compose_schema()
    assert schema["title"] == "Compose Specification"
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = sorted(validator_class(schema).iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:10])
    broken = yaml.safe_load(yaml.safe_dump(compose))
    broken["services"]["redis"]["helthcheck"] = {}
    assert not validator_class(schema).is_valid(broken), "the schema refuses unknown keys"


def test_services(compose: dict[str, Any]) -> None:
    assert {*GATEWAYS, *BACKENDS, "redis", "prometheus", "grafana"} <= set(services(compose))


def test_builds_use_the_repository_dockerfiles(compose: dict[str, Any]) -> None:
    expected = {
        **dict.fromkeys(GATEWAYS, "deploy/docker/gateway.Dockerfile"),
        **dict.fromkeys(BACKENDS, "deploy/docker/backend-cpu.Dockerfile"),
    }
    for name, dockerfile in expected.items():
        build = services(compose)[name]["build"]
        assert (COMPOSE_FILE.parent / build["context"]).resolve() == REPO
        assert build["dockerfile"] == dockerfile
        assert (REPO / dockerfile).is_file()


def test_redis_is_append_only_on_a_named_volume(compose: dict[str, Any]) -> None:
    redis = services(compose)["redis"]
    argv = redis["command"] if isinstance(redis["command"], list) else redis["command"].split()
    pairs = dict(itertools.pairwise(argv))
    assert pairs["--appendonly"] == "yes"
    assert pairs["--maxmemory-policy"] == "noeviction"
    source, _ = binds(redis)["/data"]
    assert source in compose["volumes"], "a named volume outlives the container"


def test_gateways_share_the_redis_store(compose: dict[str, Any]) -> None:
    urls = set()
    for name in GATEWAYS:
        env = environment(services(compose)[name])
        assert env["TOLLGATE_STORE"] == "redis"
        url = urlsplit(env["TOLLGATE_REDIS_URL"])
        assert url.hostname in services(compose)
        assert url.hostname == "redis" and url.port == 6379
        urls.add(env["TOLLGATE_REDIS_URL"])
        depends = services(compose)[name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy"
    assert len(urls) == 1


def test_gateways_need_a_jwt_secret_from_the_environment(compose: dict[str, Any]) -> None:
    for name in GATEWAYS:
        secret = environment(services(compose)[name])["TOLLGATE_JWT_HS_SECRET"]
        # `:?`: compose refuses to start without it instead of using a known default.
        assert re.fullmatch(r"\$\{TOLLGATE_JWT_HS_SECRET:\?.+\}", secret), secret
    text = COMPOSE_FILE.read_text()
    assert "WARNING" in text


def test_policies_and_tenants_are_mounted_read_only_where_the_image_reads_them(
    compose: dict[str, Any],
) -> None:
    for name in GATEWAYS:
        service = services(compose)[name]
        env = {**image_env(service), **environment(service)}
        mounts = binds(service)
        tenants, policies = env["TOLLGATE_TENANTS_DIR"], env["TOLLGATE_POLICIES_DIR"]
        assert mounts[tenants] == ("../tenants", "ro")
        assert mounts[policies] == ("../policies", "ro")
        override, mode = mounts[f"{policies}/models.yaml"]
        assert mode == "ro" and (COMPOSE_FILE.parent / override).is_file()
        for source, _ in mounts.values():
            if source.startswith("."):
                assert (COMPOSE_FILE.parent / source).exists(), source
        ledger, _ = mounts[env["TOLLGATE_LEDGER_DIR"]]
        assert ledger in compose["volumes"], "both gateways read the same ledger"


def test_compose_models_differ_from_the_repository_only_in_the_replicas() -> None:
    shipped = load_yaml(REPO / "policies/models.yaml")
    ours = load_yaml(DEPLOY / "compose/models.yaml")
    del shipped["pools"]["local"]["replicas"], ours["pools"]["local"]["replicas"]
    assert ours == shipped, "deploy/compose/models.yaml must follow policies/models.yaml"


def test_compose_policy_loads_and_routes_to_both_backends(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policies)
    shutil.copy(DEPLOY / "compose/models.yaml", policies / "models.yaml")
    policy = load_policy(REPO / "tenants", policies, environ={})
    replicas = policy.pools["local"].replicas
    backend_port = int(image_env(services(compose)["backend-1"])["TOLLGATE_BACKEND_PORT"])
    assert {(urlsplit(r.url).hostname, urlsplit(r.url).port) for r in replicas} == {
        (name, backend_port) for name in BACKENDS
    }
    for name in BACKENDS:
        assert str(backend_port) in [str(p) for p in services(compose)[name].get("expose", [])]


def test_prometheus_scrapes_both_gateways_and_both_backends(compose: dict[str, Any]) -> None:
    prometheus = services(compose)["prometheus"]
    source, mode = binds(prometheus)["/etc/prometheus/prometheus.yml"]
    assert mode == "ro"
    config = load_yaml(COMPOSE_FILE.parent / source)
    gateway_port = int(image_env(services(compose)["gateway-1"])["TOLLGATE_PORT"])
    backend_port = int(image_env(services(compose)["backend-1"])["TOLLGATE_BACKEND_PORT"])
    expected_ports = {
        **dict.fromkeys(GATEWAYS, gateway_port),
        **dict.fromkeys(BACKENDS, backend_port),
    }
    scraped = set()
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                assert host in services(compose), f"{target} is not a compose service"
                assert int(port) == expected_ports[host], target
                scraped.add(host)
    assert scraped == set(expected_ports)


def test_every_service_has_a_health_check(compose: dict[str, Any]) -> None:
    for name, service in services(compose).items():
        if "healthcheck" in service:
            assert service["healthcheck"]["test"], name
            continue
        df = Dockerfile.read(REPO / service["build"]["dockerfile"])
        assert df.all("HEALTHCHECK", df.final), f"{name} has no health check"


def test_published_ports_are_local_and_distinct(compose: dict[str, Any]) -> None:
    published = []
    for name, service in services(compose).items():
        for port in service.get("ports", []):
            host_ip, host_port, _ = str(port).split(":")
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond this machine"
            published.append(host_port)
    assert len(published) == len(set(published))
    gateway_ports = [services(compose)[g]["ports"][0].split(":")[2] for g in GATEWAYS]
    assert gateway_ports == [image_env(services(compose)["gateway-1"])["TOLLGATE_PORT"]] * 2


def test_grafana_is_provisioned_with_the_dashboard(compose: dict[str, Any]) -> None:
    grafana = services(compose)["grafana"]
    mounts = binds(grafana)
    provisioning, _ = mounts["/etc/grafana/provisioning"]
    provisioning_dir = COMPOSE_FILE.parent / provisioning
    (datasource,) = load_yaml(provisioning_dir / "datasources/prometheus.yaml")["datasources"]
    url = urlsplit(datasource["url"])
    assert url.hostname == "prometheus" and url.port == 9090
    assert datasource["type"] == "prometheus"
    (provider,) = load_yaml(provisioning_dir / "dashboards/tollgate.yaml")["providers"]
    dashboards = [(t, s) for t, (s, _) in mounts.items() if t.endswith(".json")]
    assert dashboards
    for target, source in dashboards:
        assert Path(target).parent == Path(provider["options"]["path"])
        assert (
            COMPOSE_FILE.parent / source
        ).resolve() == DEPLOY / "grafana/tollgate-dashboard.json"


def test_replica_urls_expand_without_any_environment() -> None:
    models = load_yaml(DEPLOY / "compose/models.yaml")
    for replica in models["pools"]["local"]["replicas"]:
        assert urlsplit(expand_env(replica["url"], {})).hostname in BACKENDS
