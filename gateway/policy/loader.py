"""Read, validate, cross-check and compile the policy files: load -> validate -> compile.

Pure apart from reading the files: no globals, no side effects. Every problem
found is collected, so one run reports all of them, and the result is either
a complete ``Policy`` or a ``PolicyError`` listing ``PolicyIssue`` values.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from gateway.policy import compiled as c
from gateway.policy.errors import PolicyError, PolicyIssue
from gateway.policy.schema import (
    HealthFile,
    LimitsWithOverrides,
    ModelFile,
    PolicyDocument,
    RoutingFile,
    TenantFile,
)

KeyPath = tuple[str | int, ...]
_M = TypeVar("_M", bound=BaseModel)

YAML_SUFFIXES = (".yaml", ".yml")

# ${VAR} or ${VAR:-default}; "$${" stays a literal "${".
_ENV_REF = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def format_key_path(path: Iterable[str | int]) -> str:
    """``("limits", "model_overrides", "m", 0)`` -> ``limits.model_overrides.m[0]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


class _Loader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys instead of keeping the last one."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable: the base class reports it
            if duplicate:
                raise ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _line_map(node: Node | None) -> dict[KeyPath, int]:
    lines: dict[KeyPath, int] = {}
    if node is None:
        return lines
    stack: list[tuple[KeyPath, Node]] = [((), node)]
    while stack:
        path, current = stack.pop()
        lines.setdefault(path, current.start_mark.line + 1)
        if isinstance(current, MappingNode):
            for key_node, value_node in current.value:
                if isinstance(key_node, ScalarNode):
                    child = (*path, key_node.value)
                    lines[child] = key_node.start_mark.line + 1
                    stack.append((child, value_node))
        elif isinstance(current, SequenceNode):
            for index, item in enumerate(current.value):
                stack.append(((*path, index), item))
    return lines


@dataclass
class _File:
    """One parsed YAML file and the line of every key path in it."""

    path: Path
    data: Any
    lines: dict[KeyPath, int] = field(default_factory=dict)

    def line_of(self, path: KeyPath) -> int | None:
        # The nearest enclosing key that exists: a missing key points at its parent.
        for end in range(len(path), -1, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return None

    def issue(self, path: KeyPath, message: str) -> PolicyIssue:
        return PolicyIssue(str(self.path), format_key_path(path), message, self.line_of(path))


def expand_env(value: str, environ: Mapping[str, str]) -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in ``value``; raise KeyError(VAR) if unset.

    ``${VAR:-default}`` also applies when VAR is set but empty, as in POSIX shells.
    """

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        body = match.group(1)
        name, sep, default = body.partition(":-")
        if not _ENV_NAME.match(name):
            raise ValueError(f"bad variable reference ${{{body}}}")
        found = environ.get(name)
        if found is not None and (found != "" or not sep):
            return found
        if sep:
            return default
        raise KeyError(name)

    return _ENV_REF.sub(replace, value)


def _expand_tree(
    data: Any, file: _File, environ: Mapping[str, str], issues: list[PolicyIssue]
) -> Any:
    def walk(node: Any, path: KeyPath) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, (*path, str(k))) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, (*path, i)) for i, v in enumerate(node)]
        if isinstance(node, str) and "${" in node:
            try:
                return expand_env(node, environ)
            except KeyError as exc:
                issues.append(file.issue(path, f"environment variable {exc.args[0]} is not set"))
            except ValueError as exc:
                issues.append(file.issue(path, str(exc)))
        return node

    return walk(data, ())


def _parse(path: Path, environ: Mapping[str, str], issues: list[PolicyIssue]) -> _File | None:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        issues.append(PolicyIssue(str(path), "", f"cannot read: {exc.strerror or exc}"))
        return None
    except UnicodeDecodeError:
        issues.append(PolicyIssue(str(path), "", "not UTF-8 text"))
        return None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        line = mark.line + 1 if mark is not None else None
        issues.append(PolicyIssue(str(path), "", f"YAML syntax error: {problem}", line))
        return None
    finally:
        loader.dispose()
    file = _File(path, None, _line_map(node))
    file.data = _expand_tree(data, file, environ, issues)
    return file


def _pydantic_issues(
    exc: ValidationError, file_for: Any, prefix: KeyPath = ()
) -> list[PolicyIssue]:
    issues = []
    for error in exc.errors(include_url=False):
        loc: KeyPath = (*prefix, *error["loc"])
        kind = error["type"]
        if kind == "extra_forbidden":
            message = "unknown key"
        elif kind == "missing":
            message = "required key is missing"
        else:
            message = error["msg"]
            if message.startswith("Value error, "):
                message = message.removeprefix("Value error, ")
        issues.append(file_for(loc).issue(loc, message))
    return issues


def _validate(model: type[_M], data: Any, file_for: Any, issues: list[PolicyIssue]) -> _M | None:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        issues.extend(_pydantic_issues(exc, file_for))
        return None


def list_yaml_files(directory: Path) -> list[Path]:
    """The policy files in ``directory`` (``*.yaml``/``*.yml``, hidden files skipped), sorted."""
    return sorted(
        p
        for p in directory.iterdir()
        if p.suffix in YAML_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


def load_policy(
    tenants_dir: Path, policies_dir: Path, *, environ: Mapping[str, str] | None = None
) -> c.Policy:
    """Load every tenant file in ``tenants_dir`` and policy file in ``policies_dir``.

    Raises PolicyError listing every problem found.
    """
    issues: list[PolicyIssue] = []
    listed: list[list[Path]] = []
    for directory in (tenants_dir, policies_dir):
        try:
            listed.append(list_yaml_files(directory))
        except OSError as exc:
            issues.append(PolicyIssue(str(directory), "", f"cannot list: {exc.strerror or exc}"))
            listed.append([])
    if issues:
        raise PolicyError(issues)
    return load_policy_files(listed[0], listed[1], environ=environ, policies_label=policies_dir)


def load_policy_files(
    tenant_files: Sequence[Path],
    policy_files: Sequence[Path],
    *,
    environ: Mapping[str, str] | None = None,
    policies_label: Path | None = None,
) -> c.Policy:
    """Load exactly these files; ``policies_label`` names the policy set in issues.

    Raises PolicyError listing every problem found.
    """
    env = os.environ if environ is None else environ
    issues: list[PolicyIssue] = []
    label = str(policies_label) if policies_label is not None else "policies"

    # Policy files: merge top-level keys, remembering which file defined each.
    merged: dict[str, Any] = {}
    origin: dict[str, _File] = {}
    for path in policy_files:
        file = _parse(path, env, issues)
        if file is None or file.data is None:
            continue
        if not isinstance(file.data, dict):
            issues.append(file.issue((), "a policy file is a mapping of top-level keys"))
            continue
        for key, value in file.data.items():
            key = str(key)
            if key in origin:
                issues.append(
                    file.issue(
                        (key,), f"top-level key {key!r} is also defined in {origin[key].path}"
                    )
                )
                continue
            origin[key] = file
            merged[key] = value

    placeholder = _File(Path(label), None)

    def policy_file_for(loc: KeyPath) -> _File:
        return origin.get(str(loc[0]), placeholder) if loc else placeholder

    document = _validate(PolicyDocument, merged, policy_file_for, issues)

    # Cross-checks use the raw names when the document itself failed, so that
    # one bad model entry does not also flag every tenant that lists it.
    model_names = _names(merged.get("models"))
    class_names = _names(merged.get("priority_classes"))
    if document is not None:
        issues.extend(_check_document(document, policy_file_for))

    tenants: dict[str, tuple[TenantFile, _File]] = {}
    for path in tenant_files:
        file = _parse(path, env, issues)
        if file is None:
            continue
        if not isinstance(file.data, dict):
            issues.append(file.issue((), "a tenant file is a mapping (see docs/schemas)"))
            continue
        raw_id = file.data.get("id")
        if isinstance(raw_id, str) and raw_id != path.stem:
            issues.append(
                file.issue(("id",), f"id {raw_id!r} must equal the file name {path.stem!r}")
            )
        tenant = _validate(TenantFile, file.data, lambda _loc, f=file: f, issues)
        if tenant is None:
            continue
        if tenant.id in tenants:
            issues.append(
                file.issue(
                    ("id",), f"tenant {tenant.id!r} is also defined in {tenants[tenant.id][1].path}"
                )
            )
            continue
        issues.extend(_check_tenant(tenant, file, model_names, class_names))
        tenants[tenant.id] = (tenant, file)

    if issues or document is None:
        raise PolicyError(issues)
    return _compile(document, {tid: t for tid, (t, _) in tenants.items()})


def _names(raw: Any) -> frozenset[str] | None:
    return frozenset(str(k) for k in raw) if isinstance(raw, dict) else None


def _check_document(doc: PolicyDocument, file_for: Any) -> list[PolicyIssue]:
    issues: list[PolicyIssue] = []
    for name, model in doc.models.items():
        loc: KeyPath
        if name in c.VIRTUAL_MODEL_NAMES:
            loc = ("models", name)
            issues.append(
                file_for(loc).issue(loc, f"{name!r} is reserved for routing (docs/routing.md)")
            )
        pool = doc.pools.get(model.pool)
        if pool is None:
            loc = ("models", name, "pool")
            issues.append(file_for(loc).issue(loc, f"unknown pool {model.pool!r}"))
            continue
        urls = {r.url for r in pool.replicas}
        for i, version in enumerate(model.versions or ()):
            for j, url in enumerate(version.replicas or ()):
                if url not in urls:
                    loc = ("models", name, "versions", i, "replicas", j)
                    issues.append(
                        file_for(loc).issue(loc, f"{url!r} is not a replica of pool {model.pool!r}")
                    )
    issues.extend(_check_routing(doc, file_for))
    for name in doc.models:
        if name not in doc.prices:
            issues.append(file_for(("prices",)).issue(("prices",), f"no price for model {name!r}"))
    for name in doc.prices:
        if name not in doc.models:
            loc = ("prices", name)
            issues.append(file_for(loc).issue(loc, f"price for unknown model {name!r}"))
    return issues


def _check_routing(doc: PolicyDocument, file_for: Any) -> list[PolicyIssue]:
    issues: list[PolicyIssue] = []
    routing = doc.routing
    for tier, name in routing.tiers.items():
        loc: KeyPath = ("routing", "tiers", tier)
        model = doc.models.get(name)
        if model is None:
            issues.append(file_for(loc).issue(loc, f"unknown model {name!r}"))
        elif model.tier != tier:
            issues.append(
                file_for(loc).issue(loc, f"model {name!r} is of tier {model.tier!r}, not {tier!r}")
            )
    for tier, other in routing.fallback.items():
        for end in (tier, other):
            if end not in routing.tiers:
                loc = ("routing", "fallback", tier)
                issues.append(
                    file_for(loc).issue(loc, f"tier {end!r} names no model (routing.tiers)")
                )
                break
    if routing.auto is not None and not routing.tiers:
        loc = ("routing", "auto")
        issues.append(file_for(loc).issue(loc, "auto needs routing.tiers to name its models"))
    return issues


def _check_tenant(
    tenant: TenantFile,
    file: _File,
    model_names: frozenset[str] | None,
    class_names: frozenset[str] | None,
) -> list[PolicyIssue]:
    issues: list[PolicyIssue] = []
    if model_names is not None:
        for i, name in enumerate(tenant.allowed_models):
            if name != "*" and name not in model_names:
                issues.append(file.issue(("allowed_models", i), f"unknown model {name!r}"))
        overrides: list[tuple[KeyPath, LimitsWithOverrides]] = [(("limits",), tenant.limits)]
        overrides += [(("apps", a, "limits"), app.limits) for a, app in tenant.apps.items()]
        for where, limits in overrides:
            for name in limits.model_overrides:
                if name not in model_names:
                    loc = (*where, "model_overrides", name)
                    issues.append(file.issue(loc, f"unknown model {name!r}"))
    if class_names is not None:
        for i, name in enumerate(tenant.allowed_priorities):
            if name not in class_names:
                issues.append(
                    file.issue(("allowed_priorities", i), f"unknown priority class {name!r}")
                )
        if tenant.default_priority not in class_names:
            issues.append(
                file.issue(
                    ("default_priority",),
                    f"unknown priority class {tenant.default_priority!r}",
                )
            )
    if tenant.default_priority not in tenant.allowed_priorities and (
        class_names is None or tenant.default_priority in class_names
    ):
        issues.append(
            file.issue(
                ("default_priority",),
                f"default priority {tenant.default_priority!r} is not in allowed_priorities",
            )
        )
    return issues


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


def _limits(raw: LimitsWithOverrides) -> c.LimitSet:
    def one(model: BaseModel) -> c.Limits:
        values = {f: getattr(model, f) for f in c.Limits.__dataclass_fields__}
        return c.Limits(**values)

    return c.LimitSet(
        base=one(raw),
        model_overrides=_frozen({m: one(o) for m, o in raw.model_overrides.items()}),
    )


def _compile(doc: PolicyDocument, tenants: Mapping[str, TenantFile]) -> c.Policy:
    pools = {
        name: c.Pool(
            name=name,
            kind=p.kind,
            replicas=tuple(
                c.Replica(url=r.url, weight=r.weight, max_in_flight=r.max_in_flight)
                for r in p.replicas
            ),
            timeouts=c.UpstreamTimeouts(
                connect_s=p.timeouts.connect_s,
                first_byte_s=p.timeouts.first_byte_s,
                between_chunks_s=p.timeouts.between_chunks_s,
                total_s=p.timeouts.total_s,
            ),
            balancer=c.BalancerConfig(**p.balancer.model_dump()),
            health=_health(p.kind, p.health),
            required=p.required,
        )
        for name, p in doc.pools.items()
    }
    models = {name: _model(name, m, pools[m.pool]) for name, m in doc.models.items()}
    classes = {
        name: c.PriorityClass(
            name=name,
            priority=p.priority,
            max_queue_wait_s=p.max_queue_wait_s,
            weight=p.weight,
            max_queue_length=p.max_queue_length,
        )
        for name, p in doc.priority_classes.items()
    }
    prices = {
        model: tuple(
            c.Price(
                effective_from=e.effective_from,
                input_per_million=e.input_per_million,
                output_per_million=e.output_per_million,
                cached_input_per_million=(
                    e.cached_input_per_million
                    if e.cached_input_per_million is not None
                    else e.input_per_million
                ),
            )
            for e in sorted(entries, key=lambda e: e.effective_from)
        )
        for model, entries in doc.prices.items()
    }
    compiled_tenants = {
        tid: c.TenantPolicy(
            tenant_id=tid,
            display_name=t.display_name,
            tier=t.tier,
            enabled=t.enabled,
            all_models=t.allowed_models == ["*"],
            allowed_models=frozenset(m for m in t.allowed_models if m != "*"),
            default_priority=t.default_priority,
            allowed_priorities=tuple(t.allowed_priorities),
            limits=_limits(t.limits),
            on_store_failure=t.on_store_failure,
            apps=_frozen(
                {a: c.AppPolicy(app_id=a, limits=_limits(app.limits)) for a, app in t.apps.items()}
            ),
        )
        for tid, t in tenants.items()
    }
    return c.Policy(
        version=_version(doc, tenants),
        loaded_at=datetime.now(UTC),
        tenants=_frozen(compiled_tenants),
        models=_frozen(models),
        pools=_frozen(pools),
        priority_classes=_frozen(classes),
        pricing=c.Pricing(currency=doc.currency, prices=_frozen(prices)),
        routing=_routing(doc.routing),
    )


# Probe paths per pool kind when a pool's health section does not name them.
_PROBE_PATHS: dict[c.PoolKind, tuple[str | None, str | None]] = {
    "tollgate": ("/health", "/ready"),
    "vllm": ("/health", "/v1/models"),
    "trtllm": ("/health", "/v1/models"),
    "openai": (None, "/v1/models"),
}


def _health(kind: c.PoolKind, raw: HealthFile) -> c.HealthConfig:
    liveness, readiness = _PROBE_PATHS[kind]
    values = raw.model_dump()
    # Omitted: the kind's path; an explicit null: no such probe.
    if "liveness_path" not in raw.model_fields_set:
        values["liveness_path"] = liveness
    if "readiness_path" not in raw.model_fields_set:
        values["readiness_path"] = readiness
    return c.HealthConfig(**values)


def _model(name: str, raw: ModelFile, pool: c.Pool) -> c.ModelRoute:
    versions = tuple(
        c.ModelVersion(
            name=v.name,
            upstream_model=v.upstream_model,
            weight=v.weight,
            replicas=frozenset(v.replicas) if v.replicas is not None else None,
        )
        for v in raw.versions or ()
    )
    upstream = raw.upstream_model if raw.upstream_model is not None else versions[0].upstream_model
    return c.ModelRoute(
        name=name,
        upstream_model=upstream,
        tier=raw.tier,
        context_length=raw.context_length,
        pool=pool,
        tokenizer=raw.tokenizer,
        versions=versions,
    )


def _routing(raw: RoutingFile) -> c.RoutingPolicy:
    auto = raw.auto
    return c.RoutingPolicy(
        tiers=_frozen({str(t): m for t, m in raw.tiers.items()}),
        tenant_tiers=_frozen({t: tuple(tiers) for t, tiers in raw.tenant_tiers.items()}),
        fallback=_frozen({str(t): str(o) for t, o in raw.fallback.items()}),
        auto=None
        if auto is None
        else c.ClassifierConfig(
            threshold=auto.threshold,
            bias=auto.bias,
            weights=_frozen({str(f): w for f, w in auto.weights.items()}),
            long_prompt_tokens=auto.long_prompt_tokens,
            long_output_tokens=auto.long_output_tokens,
            many_turns=auto.many_turns,
        ),
    )


def _version(doc: PolicyDocument, tenants: Mapping[str, TenantFile]) -> str:
    # Hash what takes effect (after env expansion and defaults), not the bytes:
    # a comment edit keeps the version, a changed env variable does not.
    canonical = {
        "policy": doc.model_dump(mode="json"),
        "tenants": {tid: t.model_dump(mode="json") for tid, t in tenants.items()},
    }
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
