"""JSON Schemas for editors and CI, and the check behind ``tollgate policy validate``."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gateway.policy.errors import PolicyError, PolicyIssue
from gateway.policy.loader import list_yaml_files, load_policy_files
from gateway.policy.schema import PolicyDocument, TenantFile

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TENANTS_DIR = REPO_ROOT / "tenants"
DEFAULT_POLICIES_DIR = REPO_ROOT / "policies"
SCHEMA_FILES: Mapping[str, str] = {
    "tenant": "tenant.schema.json",
    "policy": "policy.schema.json",
}
_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _allow_env_references(node: Any) -> None:
    # Files hold ${VAR} before expansion, so a patterned string (a URL, a name)
    # must also accept a value that contains a reference.
    if isinstance(node, dict):
        if node.get("type") == "string" and isinstance(node.get("pattern"), str):
            node["pattern"] = f"(?:{node['pattern']})|\\$\\{{"
        for value in node.values():
            _allow_env_references(value)
    elif isinstance(node, list):
        for item in node:
            _allow_env_references(item)


def tenant_json_schema() -> dict[str, Any]:
    """JSON Schema of one ``tenants/<id>.yaml`` file (before ``${VAR}`` expansion)."""
    schema = TenantFile.model_json_schema()
    _allow_env_references(schema)
    schema["$schema"] = _DIALECT
    schema["title"] = "Tollgate tenant"
    return schema


def policy_json_schema() -> dict[str, Any]:
    """JSON Schema of one ``policies/*.yaml`` file (before ``${VAR}`` expansion).

    No top-level key is required here: the keys may be split across files,
    and the loader checks that together they define all of them.
    """
    schema = PolicyDocument.model_json_schema()
    schema.pop("required", None)
    _allow_env_references(schema)
    schema["$schema"] = _DIALECT
    schema["title"] = "Tollgate policy file"
    return schema


def render_json_schemas() -> dict[str, str]:
    """File name -> exact file content, as ``write_json_schemas`` writes them."""
    schemas = {"tenant": tenant_json_schema(), "policy": policy_json_schema()}
    return {
        SCHEMA_FILES[kind]: json.dumps(schema, indent=2, sort_keys=True) + "\n"
        for kind, schema in schemas.items()
    }


def write_json_schemas(docs_dir: Path) -> list[Path]:
    """Write ``docs_dir/schemas/{tenant,policy}.schema.json``; returns the paths written."""
    target = docs_dir / "schemas"
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in render_json_schemas().items():
        path = target / name
        path.write_text(content, encoding="utf-8")
        written.append(path)
    return written


def _is_tenant_path(path: Path) -> bool:
    # Tenant files are told apart by where they live, never by what they contain.
    return path.name == "tenants" if path.is_dir() else path.parent.name == "tenants"


def validate_paths(
    paths: Sequence[Path] | None = None, *, environ: Mapping[str, str] | None = None
) -> list[PolicyIssue]:
    """Every issue in the policy formed by ``paths``; an empty list means valid.

    ``paths`` are files or directories; a directory named ``tenants`` (or a
    file inside one) holds tenant files, anything else policy files; a single
    policy file is checked together with the other files in its directory,
    because top-level keys may be split across them. When only one kind is
    given, the other comes from the sibling ``tenants/`` or ``policies/``
    directory, or from the repository's, so that cross-file rules are still
    checked. With no paths, the repository's own directories.
    """
    if not paths:
        paths = [DEFAULT_TENANTS_DIR, DEFAULT_POLICIES_DIR]
    issues: list[PolicyIssue] = []
    tenant_files: list[Path] = []
    policy_files: list[Path] = []
    tenant_dirs: list[Path] = []
    policy_dirs: list[Path] = []
    for path in paths:
        if not path.exists():
            issues.append(PolicyIssue(str(path), "", "no such file or directory"))
            continue
        is_tenant = _is_tenant_path(path)
        # Policy keys may be split across files, so a single policy file is
        # checked together with the rest of its directory; tenants stand alone.
        if path.is_dir():
            files = list_yaml_files(path)
        elif is_tenant:
            files = [path]
        else:
            files = [path, *list_yaml_files(path.parent)]
        (tenant_files if is_tenant else policy_files).extend(files)
        home = path if path.is_dir() else path.parent
        (tenant_dirs if is_tenant else policy_dirs).append(home)
    if issues:
        return issues
    if not policy_dirs:
        sibling = tenant_dirs[0].parent / "policies"
        policy_dirs.append(sibling if sibling.is_dir() else DEFAULT_POLICIES_DIR)
        policy_files = list_yaml_files(policy_dirs[0])
    if not tenant_dirs:
        sibling = policy_dirs[0].parent / "tenants"
        tenant_files = list_yaml_files(sibling if sibling.is_dir() else DEFAULT_TENANTS_DIR)
    try:
        load_policy_files(
            list(dict.fromkeys(tenant_files)),
            list(dict.fromkeys(policy_files)),
            environ=os.environ if environ is None else environ,
            policies_label=policy_dirs[0],
        )
    except PolicyError as exc:
        return list(exc.issues)
    return []


if __name__ == "__main__":
    for written in write_json_schemas(REPO_ROOT / "docs"):
        print(written)
