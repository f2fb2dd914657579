"""Offline readers for the files under deploy/: a kustomize renderer for the
subset of kustomize the manifests use, Dockerfile and .dockerignore helpers,
and the Prometheus-name helpers the dashboard test needs."""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from dockerfile_parse import DockerfileParser

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SCHEMAS = Path(__file__).resolve().parent / "schemas"

Obj = dict[str, Any]
"""One Kubernetes object (or any parsed YAML mapping)."""


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_yaml_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def load_schema(name: str) -> Obj:
    schema: Obj = json.loads((SCHEMAS / name).read_text(encoding="utf-8"))
    return schema


# --- kustomize ---------------------------------------------------------------

# Keys of a Kustomization or Component this renderer implements; any other key
# fails the render, so a manifest change it cannot follow is never validated
# half-way.
_KUSTOMIZE_KEYS = {
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "components",
    "configMapGenerator",
    "generatorOptions",
}
_GENERATOR_KEYS = {"name", "files", "options", "behavior"}
_CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "PriorityClass",
    "StorageClass",
}


class RenderError(Exception):
    """The kustomization uses something this renderer does not implement."""


def render_kustomization(directory: Path, spec: Mapping[str, Any] | None = None) -> list[Obj]:
    """The objects `kubectl kustomize directory` prints, for the features in
    ``_KUSTOMIZE_KEYS``: resources (files and folders), components,
    configMapGenerator with files, generatorOptions (labels, no name hash)
    and namespace. ``spec`` replaces the folder's kustomization.yaml."""
    if spec is None:
        spec = load_yaml(directory / "kustomization.yaml")
    assert spec is not None
    unknown = set(spec) - _KUSTOMIZE_KEYS
    if unknown:
        raise RenderError(f"{directory}: unsupported kustomization keys {sorted(unknown)}")
    objects: list[Obj] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        _check_within(directory, path, entry, is_file=path.is_file())
        if path.is_dir():
            objects.extend(render_kustomization(path))
        else:
            objects.extend(load_yaml_all(path))
    for entry in spec.get("components", []):
        path = (directory / entry).resolve()
        component = load_yaml(path / "kustomization.yaml")
        if component.get("kind") != "Component":
            raise RenderError(f"{path} is listed as a component but is a {component.get('kind')}")
        objects.extend(render_kustomization(path, component))
    options = spec.get("generatorOptions", {})
    for generator in spec.get("configMapGenerator", []):
        objects.append(_config_map(directory, generator, options))
    namespace = spec.get("namespace")
    if namespace:
        for obj in objects:
            if obj["kind"] == "Namespace":
                obj["metadata"]["name"] = namespace
            elif obj["kind"] not in _CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
    return objects


def _check_within(root: Path, path: Path, entry: str, *, is_file: bool) -> None:
    # kustomize's default load restrictor: files must lie in or below the
    # kustomization's folder (folders of other kustomizations may lie anywhere).
    if is_file and not path.is_relative_to(root.resolve()):
        raise RenderError(f"{root}: {entry} is outside the kustomization folder")


def _config_map(directory: Path, generator: Mapping[str, Any], options: Mapping[str, Any]) -> Obj:
    unknown = set(generator) - _GENERATOR_KEYS
    if unknown:
        raise RenderError(f"configMapGenerator keys {sorted(unknown)} are not supported")
    merged = {**options, **generator.get("options", {})}
    if not merged.get("disableNameSuffixHash"):
        raise RenderError("generated names with a hash suffix are not supported")
    data: dict[str, str] = {}
    for entry in generator.get("files", []):
        key, sep, source = str(entry).partition("=")
        if not sep:
            key, source = Path(entry).name, entry
        path = (directory / source).resolve()
        if not path.is_file():
            raise RenderError(f"{directory}: configMapGenerator file {source} does not exist")
        _check_within(directory, path, source, is_file=True)
        data[key] = path.read_text(encoding="utf-8")
    metadata: dict[str, Any] = {"name": generator["name"]}
    if merged.get("labels"):
        metadata["labels"] = dict(merged["labels"])
    if merged.get("annotations"):
        metadata["annotations"] = dict(merged["annotations"])
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def by_kind(objects: Iterable[Obj], kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def pod_spec(workload: Mapping[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def env_of(container: Mapping[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def resolve_port(container: Mapping[str, Any], port: int | str) -> int:
    """A probe's or Service's port (number or name) as the container's port number."""
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return int(p["containerPort"])
    raise AssertionError(f"container {container['name']} has no port named {port!r}")


# --- Dockerfiles ---------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    name: str
    value: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, or None for shell form."""
        text = self.value.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                return None
            if isinstance(parsed, list) and all(isinstance(p, str) for p in parsed):
                return parsed
        return None


@dataclass(frozen=True)
class Dockerfile:
    path: Path
    instructions: tuple[Instruction, ...]

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        with path.open("rb") as f:
            parser = DockerfileParser(fileobj=f, env_replace=False)
            structure = parser.structure
        return cls(
            path,
            tuple(Instruction(i["instruction"], i["value"], i["startline"] + 1) for i in structure),
        )

    @property
    def stages(self) -> list[list[Instruction]]:
        """Instructions per build stage (ARGs before the first FROM are left out)."""
        stages: list[list[Instruction]] = []
        for ins in self.instructions:
            if ins.name == "FROM":
                stages.append([ins])
            elif stages:
                stages[-1].append(ins)
        return stages

    @property
    def final(self) -> list[Instruction]:
        return self.stages[-1]

    def global_args(self) -> dict[str, str]:
        out = {}
        for ins in self.instructions:
            if ins.name == "FROM":
                break
            if ins.name == "ARG":
                name, _, default = ins.value.partition("=")
                out[name.strip()] = default.strip()
        return out

    def all(self, name: str, stage: list[Instruction] | None = None) -> list[Instruction]:
        return [i for i in (stage if stage is not None else self.instructions) if i.name == name]

    def env(self, stage: list[Instruction]) -> dict[str, str]:
        """ENV values set in ``stage`` (``KEY=VALUE`` pairs, quotes removed)."""
        out: dict[str, str] = {}
        for ins in self.all("ENV", stage):
            for key, value in re.findall(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S*)', ins.value):
                out[key] = value.strip('"')
        return out


def copy_sources(ins: Instruction) -> tuple[list[str], str, dict[str, str]]:
    """A COPY or ADD instruction's sources, destination and --flags."""
    parts = ins.exec_form() or ins.value.split()
    flags: dict[str, str] = {}
    while parts and parts[0].startswith("--"):
        key, _, value = parts.pop(0)[2:].partition("=")
        flags[key] = value
    return parts[:-1], parts[-1], flags


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether a .dockerignore with ``patterns`` leaves ``path`` (or a folder
    above it) out of the build context: the last matching pattern decides."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip("/")
        if any(_ignore_match(pattern, c) for c in candidates):
            excluded = not negate
    return excluded


def _ignore_match(pattern: str, path: str) -> bool:
    if pattern.startswith("**/"):
        rest = pattern[3:]
        parts = path.split("/")
        return any(_ignore_match(rest, "/".join(parts[i:])) for i in range(len(parts)))
    pattern_parts, path_parts = pattern.split("/"), path.split("/")
    return len(pattern_parts) == len(path_parts) and all(
        fnmatch.fnmatchcase(p, q) for q, p in zip(pattern_parts, path_parts, strict=True)
    )


def read_dockerignore(dockerfile: Path) -> list[str]:
    """The patterns of ``<Dockerfile>.dockerignore`` (BuildKit reads it beside the Dockerfile)."""
    path = dockerfile.with_name(dockerfile.name + ".dockerignore")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


# --- Prometheus names ------------------------------------------------------------

_TYPE_LINE = re.compile(r"^# TYPE (\S+) (\S+)\s*$")
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("_sum", "_count", "_created"),
}


def metric_families(exposition: str) -> dict[str, str]:
    """``{family: type}`` from the ``# TYPE`` lines of a text exposition."""
    out = {}
    for line in exposition.splitlines():
        match = _TYPE_LINE.match(line)
        if match:
            out[match.group(1)] = match.group(2)
    return out


def sample_names(families: Mapping[str, str]) -> set[str]:
    """Every series name the families can expose: a counter ``x`` as ``x_total``
    (and ``x`` itself, which older exporters put in the TYPE line with its
    ``_total``), a histogram ``x`` as ``x_bucket``, ``x_sum`` and ``x_count``, ..."""
    names: set[str] = set()
    for family, kind in families.items():
        names.add(family)
        names.update(family + suffix for suffix in _SUFFIXES.get(kind, ()))
    return names


_PROMQL_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_PROMQL_MATCHERS = re.compile(r"\{[^{}]*\}")
_PROMQL_RANGE = re.compile(r"\[[^\]]*\]")
_PROMQL_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE
)
_PROMQL_OFFSET = re.compile(r"\boffset\s+-?[0-9a-z]+", re.IGNORECASE)
_PROMQL_NUMBER = re.compile(r"(?<![A-Za-z0-9_:])(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_PROMQL_VARIABLE = re.compile(r"\$\{[^}]*\}|\$[A-Za-z_]\w*")
_PROMQL_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_PROMQL_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "inf",
    "nan",
    "atan2",
}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, keywords,
    label names, label values, numbers or Grafana variables)."""
    text = _PROMQL_STRING.sub(" ", expr)
    text = _PROMQL_MATCHERS.sub(" ", text)
    text = _PROMQL_RANGE.sub(" ", text)
    text = _PROMQL_GROUPING.sub(" ", text)
    text = _PROMQL_OFFSET.sub(" ", text)
    text = _PROMQL_VARIABLE.sub(" ", text)
    text = _PROMQL_NUMBER.sub(" ", text)
    names = set()
    for match in _PROMQL_IDENT.finditer(text):
        following = text[match.end() :].lstrip()
        if following.startswith("("):
            continue  # a function or an aggregation
        if match.group(0).lower() in _PROMQL_KEYWORDS:
            continue
        names.add(match.group(0))
    return names


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)")


def template_metric_names(query: str) -> set[str]:
    """The metric a Grafana Prometheus variable query reads (``label_values(m, l)``,
    ``query_result(...)``, ``metrics(...)`` left out)."""
    match = _LABEL_VALUES.match(query)
    if match:
        return {match.group(1)}
    if query.strip().startswith("query_result("):
        return promql_metric_names(query.strip()[len("query_result(") : -1])
    return set()


def dashboard_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])
