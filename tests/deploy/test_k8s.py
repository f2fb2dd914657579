"""The Kubernetes manifests under deploy/k8s, rendered as `kubectl apply -k`
would apply them and validated offline against the Kubernetes JSON schemas
(kubernetes-validate) and, for KEDA and the Prometheus Operator, against the
schemas in tests/deploy/schemas."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.version import Version

from gateway.policy.loader import expand_env, load_policy
from tests.deploy.support import (
    DEPLOY,
    REPO,
    Dockerfile,
    Obj,
    RenderError,
    by_kind,
    env_of,
    load_schema,
    load_yaml,
    pod_spec,
    render_kustomization,
    resolve_port,
)

K8S = DEPLOY / "k8s"
BASE = K8S / "base"
CONFIG = BASE / "config"
NAMESPACE = "tollgate"
# The oldest Kubernetes the manifests promise to work on (1.29, or the oldest
# schemas the installed kubernetes-validate still ships), and the newest it knows.
_SHIPPED = kubernetes_validate.utils.all_versions()
KUBERNETES_VERSIONS = sorted(
    {
        next((v for v in _SHIPPED if Version(v) >= Version("1.29")), _SHIPPED[0]),
        kubernetes_validate.utils.latest_version(),
    },
    key=Version,
)
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject.schema.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.schema.json",
}
WORKLOAD_KINDS = ("Deployment", "StatefulSet")


def _variant(components: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": NAMESPACE,
        "resources": ["base"],
        "components": components,
    }


# Every way the manifests are meant to be applied: the default set, the base
# alone, and the base with the optional components.
VARIANTS = {
    "default": None,
    "base": _variant([]),
    "hpa-external+servicemonitor": _variant(
        ["components/hpa-external", "components/servicemonitor"]
    ),
}


def render(variant: str) -> list[Obj]:
    spec = VARIANTS[variant]
    return render_kustomization(K8S, spec)


@pytest.fixture(scope="module")
def default() -> list[Obj]:
    return render("default")


@pytest.fixture(scope="module")
def everything() -> list[Obj]:
    """The default set plus the optional components' objects (names may repeat
    across variants: the two backend autoscalers are alternatives)."""
    return render("default") + [
        o for o in render("hpa-external+servicemonitor") if o["kind"] in ("ServiceMonitor",)
    ]


def _containers(objects: list[Obj]) -> list[tuple[Obj, Obj]]:
    return [
        (w, c)
        for w in objects
        if w["kind"] in WORKLOAD_KINDS
        for c in pod_spec(w).get("initContainers", []) + pod_spec(w)["containers"]
    ]


def _container(objects: list[Obj], deployment: str, name: str) -> Obj:
    spec = pod_spec(by_kind(objects, "Deployment")[deployment])
    return next(c for c in spec["containers"] if c["name"] == name)


# --- schema validation ---------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_object_validates_against_its_schema(variant: str, version: str) -> None:
    objects = render(variant)
    assert objects
    for obj in objects:
        where = f"{variant}: {obj['kind']}/{obj['metadata']['name']}"
        schema_name = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        if schema_name is not None:
            jsonschema.Draft202012Validator(load_schema(schema_name)).validate(obj)
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{where} (Kubernetes {version}): {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{where}: no schema for {obj['apiVersion']} {obj['kind']}")


def test_crd_schemas_reject_typos() -> None:
    scaled = load_yaml(K8S / "components/keda/backend-scaledobject.yaml")
    validator = jsonschema.Draft202012Validator(load_schema("keda-scaledobject.schema.json"))
    validator.validate(scaled)
    scaled["spec"]["maxReplicas"] = 3  # the HPA's spelling, not KEDA's
    assert not validator.is_valid(scaled)
    scaled = load_yaml(K8S / "components/keda/backend-scaledobject.yaml")
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 16  # must be a string
    assert not validator.is_valid(scaled)


def test_names_are_unique_and_namespaced(default: list[Obj]) -> None:
    keys = [(o["kind"], o["metadata"]["name"]) for o in default]
    assert len(keys) == len(set(keys))
    for obj in default:
        if obj["kind"] == "Namespace":
            assert obj["metadata"]["name"] == NAMESPACE
        else:
            assert obj["metadata"].get("namespace") == NAMESPACE, obj["metadata"]["name"]


def test_default_set(default: list[Obj]) -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in default}
    assert {
        ("Namespace", NAMESPACE),
        ("Deployment", "tollgate-gateway"),
        ("Service", "tollgate-gateway"),
        ("HorizontalPodAutoscaler", "tollgate-gateway"),
        ("PodDisruptionBudget", "tollgate-gateway"),
        ("Deployment", "tollgate-backend"),
        ("Service", "tollgate-backend"),
        ("StatefulSet", "tollgate-redis"),
        ("Service", "tollgate-redis"),
        ("ScaledObject", "tollgate-backend"),
        ("ConfigMap", "tollgate-tenants"),
        ("ConfigMap", "tollgate-policies"),
    } <= kinds
    # KEDA owns the backend's HPA: a second one would fight it.
    assert ("HorizontalPodAutoscaler", "tollgate-backend") not in kinds


# --- the properties that matter ------------------------------------------------------


def test_every_pod_runs_as_non_root_without_privileges(default: list[Obj]) -> None:
    for workload, container in _containers(default):
        where = f"{workload['metadata']['name']}/{container['name']}"
        pod_ctx = pod_spec(workload).get("securityContext", {})
        ctx = {**pod_ctx, **container.get("securityContext", {})}
        assert ctx.get("runAsNonRoot") is True, where
        assert isinstance(ctx.get("runAsUser"), int) and ctx["runAsUser"] > 0, where
        assert ctx.get("allowPrivilegeEscalation") is False, where
        assert "ALL" in ctx.get("capabilities", {}).get("drop", []), where
        assert ctx.get("readOnlyRootFilesystem") is True, where
        assert ctx.get("privileged") is not True, where
        assert pod_spec(workload).get("automountServiceAccountToken") is False, where
        assert container.get("resources", {}).get("requests"), f"{where}: no resource requests"
        assert container.get("resources", {}).get("limits", {}).get("memory"), where


def test_images_are_pinned(default: list[Obj]) -> None:
    for _, container in _containers(default):
        image = container["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image


def test_gateway_uids_match_the_images(default: list[Obj]) -> None:
    uid = int(_image_user("gateway").split(":")[0])
    for name in ("tollgate-gateway", "tollgate-ledger"):
        assert pod_spec(by_kind(default, "Deployment")[name])["securityContext"]["runAsUser"] == uid
    uid = int(_image_user("backend-gpu").split(":")[0])
    backend = pod_spec(by_kind(default, "Deployment")["tollgate-backend"])
    assert backend["securityContext"]["runAsUser"] == uid


def _image_user(name: str) -> str:
    df = Dockerfile.read(DEPLOY / "docker" / f"{name}.Dockerfile")
    return df.all("USER", df.final)[-1].value.strip()


def _image_env(name: str) -> dict[str, str]:
    df = Dockerfile.read(DEPLOY / "docker" / f"{name}.Dockerfile")
    return df.env(df.final)


def _probe(container: Obj, kind: str) -> tuple[str, int]:
    probe = container[kind]["httpGet"]
    return probe["path"], resolve_port(container, probe["port"])


def test_gateway_probes(default: list[Obj]) -> None:
    gateway = _container(default, "tollgate-gateway", "gateway")
    port = int(env_of(gateway)["TOLLGATE_PORT"])
    assert port == int(_image_env("gateway")["TOLLGATE_PORT"])
    assert _probe(gateway, "livenessProbe") == ("/healthz", port)
    assert _probe(gateway, "readinessProbe") == ("/readyz", port)
    assert resolve_port(gateway, "http") == port


def test_backend_probes_gpu_and_scheduling(default: list[Obj]) -> None:
    deployment = by_kind(default, "Deployment")["tollgate-backend"]
    backend = _container(default, "tollgate-backend", "backend")
    port = int(env_of(backend)["TOLLGATE_BACKEND_PORT"])
    assert port == int(_image_env("backend-gpu")["TOLLGATE_BACKEND_PORT"])
    assert _probe(backend, "startupProbe") == ("/ready", port)
    assert _probe(backend, "readinessProbe") == ("/ready", port)
    assert _probe(backend, "livenessProbe") == ("/health", port)
    startup = backend["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "room to load a model"
    assert str(backend["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert backend["image"].startswith("tollgate-backend-gpu:")
    env = env_of(backend)
    assert env["TOLLGATE_GPU_SERVER"] == "tollgate" and env["TOLLGATE_ENGINE"] == "tensorrt_llm"
    spec = pod_spec(deployment)
    gpu_nodes = spec.get("nodeSelector", {}) or spec.get("affinity", {})
    assert any("nvidia.com/gpu" in key for key in gpu_nodes), "scheduled on GPU nodes"
    assert any(t["key"] == "nvidia.com/gpu" for t in spec.get("tolerations", []))
    # The model path the entry point passes is where the model volume is mounted.
    mounts = {m["mountPath"]: m for m in backend["volumeMounts"]}
    assert any(env["TOLLGATE_MODEL"].startswith(path + "/") for path in mounts)


def test_configmaps_are_mounted_as_folders_where_the_gateway_reads_them(
    default: list[Obj],
) -> None:
    config_maps = by_kind(default, "ConfigMap")
    for workload, container in _containers(default):
        volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            volume = volumes.get(mount["name"], {})  # else a volumeClaimTemplate
            if "configMap" in volume or "secret" in volume:
                # subPath mounts never see the kubelet's updates.
                assert "subPath" not in mount and "subPathExpr" not in mount, mount
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps
                assert "items" not in volume["configMap"], "every file of the ConfigMap"
    gateway = _container(default, "tollgate-gateway", "gateway")
    env = env_of(gateway)
    volumes = {
        v["name"]: v
        for v in pod_spec(by_kind(default, "Deployment")["tollgate-gateway"])["volumes"]
    }
    mounted = {
        m["mountPath"]: volumes[m["name"]].get("configMap", {}).get("name")
        for m in gateway["volumeMounts"]
    }
    assert mounted[env["TOLLGATE_TENANTS_DIR"]] == "tollgate-tenants"
    assert mounted[env["TOLLGATE_POLICIES_DIR"]] == "tollgate-policies"


def test_configmaps_keep_their_names_so_updates_reload_in_place() -> None:
    spec = load_yaml(BASE / "kustomization.yaml")
    assert spec["generatorOptions"]["disableNameSuffixHash"] is True
    spec["generatorOptions"]["disableNameSuffixHash"] = False
    with pytest.raises(RenderError):
        render_kustomization(BASE, spec)


def test_jwt_key_comes_from_a_secret(default: list[Obj]) -> None:
    gateway = _container(default, "tollgate-gateway", "gateway")
    key_file = env_of(gateway)["TOLLGATE_JWT_HS_SECRET_FILE"]
    volumes = {
        v["name"]: v
        for v in pod_spec(by_kind(default, "Deployment")["tollgate-gateway"])["volumes"]
    }
    mount = next(
        m for m in gateway["volumeMounts"] if key_file.startswith(m["mountPath"].rstrip("/") + "/")
    )
    secret = volumes[mount["name"]]["secret"]
    assert secret["secretName"] == "tollgate-jwt"
    assert not {"TOLLGATE_JWT_HS_SECRET"} & set(env_of(gateway)), "no secret in plain env"


def test_services_select_their_workloads_and_ports(everything: list[Obj]) -> None:
    workloads = [o for o in everything if o["kind"] in WORKLOAD_KINDS]
    for service in by_kind(everything, "Service").values():
        selector = service["spec"]["selector"]
        matched = [
            w
            for w in workloads
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matched) == 1, f"Service {service['metadata']['name']} selects {len(matched)}"
        (container,) = pod_spec(matched[0])["containers"]
        for port in service["spec"]["ports"]:
            resolve_port(container, port.get("targetPort", port["port"]))
    for workload in workloads:
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()


def test_autoscalers_and_disruption_budget_target_the_deployments(everything: list[Obj]) -> None:
    deployments = by_kind(everything, "Deployment")
    gateway_hpa = by_kind(everything, "HorizontalPodAutoscaler")["tollgate-gateway"]
    ref = gateway_hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", "tollgate-gateway")
    assert ref["name"] in deployments
    (metric,) = gateway_hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    gateway = _container(everything, "tollgate-gateway", "gateway")
    assert gateway["resources"]["requests"]["cpu"], "CPU utilisation needs a CPU request"
    assert gateway_hpa["spec"]["minReplicas"] >= 2

    pdb = by_kind(everything, "PodDisruptionBudget")["tollgate-gateway"]
    labels = deployments["tollgate-gateway"]["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < gateway_hpa["spec"]["minReplicas"], "drains can proceed"

    scaled = by_kind(everything, "ScaledObject")["tollgate-backend"]
    ref = scaled["spec"]["scaleTargetRef"]
    assert ref.get("kind", "Deployment") == "Deployment" and ref["name"] == "tollgate-backend"
    assert ref["name"] in deployments
    queries = [
        t["metadata"]["query"] for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"
    ]
    assert 'sum(tollgate_queue_depth{pool="local"})' in queries
    assert 0 < scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]


def test_external_metric_hpa_alternative() -> None:
    objects = render("hpa-external+servicemonitor")
    assert "tollgate-backend" not in by_kind(objects, "ScaledObject")
    hpa = by_kind(objects, "HorizontalPodAutoscaler")["tollgate-backend"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "tollgate-backend"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] == "tollgate_queue_depth"
    assert metric["external"]["metric"]["selector"]["matchLabels"] == {"pool": "local"}


def test_service_monitors_scrape_named_service_ports() -> None:
    objects = render("hpa-external+servicemonitor")
    services = by_kind(objects, "Service").values()
    monitors = by_kind(objects, "ServiceMonitor")
    assert set(monitors) == {"tollgate-gateway", "tollgate-backend"}
    for monitor in monitors.values():
        selector = monitor["spec"]["selector"]["matchLabels"]
        (service,) = [s for s in services if selector.items() <= s["metadata"]["labels"].items()]
        port_names = {p["name"] for p in service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"


def test_redis_persists_append_only_to_a_volume(default: list[Obj]) -> None:
    redis = by_kind(default, "StatefulSet")["tollgate-redis"]
    (container,) = pod_spec(redis)["containers"]
    argv = container.get("command", []) + container.get("args", [])
    pairs = dict(itertools.pairwise(argv))
    assert pairs["--appendonly"] == "yes"
    assert pairs["--maxmemory-policy"] == "noeviction"
    claims = {t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[pairs["--dir"]] in claims
    # The gateways and the drainer reach Redis through its Service.
    service = by_kind(default, "Service")[redis["spec"]["serviceName"]]
    redis_port = next(p["port"] for p in service["spec"]["ports"])
    for name, container_name in (("tollgate-gateway", "gateway"), ("tollgate-ledger", "drainer")):
        env = env_of(_container(default, name, container_name))
        assert env["TOLLGATE_STORE"] == "redis"
        url = urlsplit(env["TOLLGATE_REDIS_URL"])
        assert (url.hostname, url.port) == (service["metadata"]["name"], redis_port)


def test_volume_claims_exist(default: list[Obj]) -> None:
    claims = by_kind(default, "PersistentVolumeClaim")
    for workload in default:
        if workload["kind"] not in WORKLOAD_KINDS:
            continue
        for volume in pod_spec(workload).get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims


def test_ledger_is_drained_by_one_pod_and_read_by_the_gateways(default: list[Obj]) -> None:
    ledger = by_kind(default, "Deployment")["tollgate-ledger"]
    assert ledger["spec"]["replicas"] == 1 and ledger["spec"]["strategy"]["type"] == "Recreate"
    drainer = _container(default, "tollgate-ledger", "drainer")
    assert drainer["command"] == ["tollgate", "usage", "drain"]
    gateway = _container(default, "tollgate-gateway", "gateway")
    assert env_of(gateway)["TOLLGATE_LEDGER_DRAINER"] == "off"
    for container in (drainer, gateway):
        ledger_dir = env_of(container)["TOLLGATE_LEDGER_DIR"]
        assert ledger_dir in {m["mountPath"] for m in container["volumeMounts"]}
    claim = by_kind(default, "PersistentVolumeClaim")["tollgate-ledger"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"], "several pods on several nodes"


# --- the policy the ConfigMaps carry ---------------------------------------------------


def _generated_files(kind: str) -> list[str]:
    spec = load_yaml(BASE / "kustomization.yaml")
    name = f"tollgate-{kind}"
    (generator,) = [g for g in spec["configMapGenerator"] if g["name"] == name]
    return sorted(generator["files"])


@pytest.mark.parametrize("kind", ["tenants", "policies"])
def test_configmap_lists_every_config_file(kind: str) -> None:
    on_disk = sorted(f"config/{kind}/{p.name}" for p in (CONFIG / kind).glob("*.yaml"))
    assert _generated_files(kind) == on_disk


@pytest.mark.parametrize("kind", ["tenants", "policies"])
def test_config_copies_match_the_repository(kind: str) -> None:
    hint = "run deploy/k8s/sync-config.sh (and list new files in base/kustomization.yaml)"
    shipped = {p.name for p in (REPO / kind).glob("*.yaml")}
    copied = {p.name for p in (CONFIG / kind).glob("*.yaml")}
    assert copied == shipped, hint
    for name in sorted(shipped - {"models.yaml"}):
        assert (CONFIG / kind / name).read_bytes() == (REPO / kind / name).read_bytes(), (
            f"{kind}/{name}: {hint}"
        )


def _without(document: Obj, *paths: tuple[str, ...]) -> Obj:
    out: Obj = yaml.safe_load(yaml.safe_dump(document))
    for path in paths:
        node = out
        for key in path[:-1]:
            node = node[key]
        node.pop(path[-1])
    return out


def test_kubernetes_models_differ_from_the_repository_only_in_the_pool_endpoints() -> None:
    shipped = load_yaml(REPO / "policies/models.yaml")
    ours = load_yaml(CONFIG / "policies/models.yaml")
    allowed = (("pools", "local", "replicas"), ("pools", "local", "health"))
    assert _without(ours, *allowed) == _without(shipped, *allowed), (
        "deploy/k8s/base/config/policies/models.yaml must follow policies/models.yaml"
    )


def test_configmap_policy_loads_and_points_at_the_backend_service(
    default: list[Obj], tmp_path: Path
) -> None:
    config_maps = by_kind(default, "ConfigMap")
    for kind in ("tenants", "policies"):
        folder = tmp_path / kind
        folder.mkdir()
        for key, text in config_maps[f"tollgate-{kind}"]["data"].items():
            (folder / key).write_text(text)
    env = env_of(_container(default, "tollgate-gateway", "gateway"))
    policy = load_policy(tmp_path / "tenants", tmp_path / "policies", environ=env)
    assert set(policy.tenants) == {p.stem for p in (REPO / "tenants").glob("*.yaml")}
    (replica,) = policy.pools["local"].replicas
    url = urlsplit(replica.url)
    service = by_kind(default, "Service")["tollgate-backend"]
    assert url.hostname == service["metadata"]["name"]
    assert url.port == service["spec"]["ports"][0]["port"]
    # Without the variable, the file's own default says the same.
    raw = load_yaml(CONFIG / "policies/models.yaml")["pools"]["local"]["replicas"][0]["url"]
    assert expand_env(raw, {}) == replica.url
    # The in-flight cap covers every pod the ScaledObject may start.
    scaled = by_kind(default, "ScaledObject")["tollgate-backend"]
    assert replica.max_in_flight >= 32 * scaled["spec"]["maxReplicaCount"]


# --- the real kustomize, where installed ------------------------------------------------


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_renderer_agrees_with_kubectl_kustomize(default: list[Obj]) -> None:
    proc = subprocess.run(
        ["kubectl", "kustomize", str(K8S)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KUBECONFIG": os.devnull},
    )
    if proc.returncode != 0 and "unknown command" in proc.stderr:
        pytest.skip("this kubectl has no kustomize")
    assert proc.returncode == 0, proc.stderr
    theirs = [d for d in yaml.safe_load_all(proc.stdout) if d]

    def key(o: Obj) -> tuple[str, str]:
        return (o["kind"], o["metadata"]["name"])

    assert sorted(theirs, key=key) == sorted(default, key=key)
