"""Policy files: the shipped examples, every error kind, env expansion, schemas."""

from __future__ import annotations

import json
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gateway.policy.errors import PolicyError, PolicyIssue
from gateway.policy.loader import expand_env, load_policy
from gateway.policy.schema_export import (
    policy_json_schema,
    render_json_schemas,
    tenant_json_schema,
    validate_paths,
    write_json_schemas,
)

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def tree(policy_dirs: tuple[Path, Path]) -> Path:
    """The folder holding the conftest's private tenants/ and policies/ copies."""
    return policy_dirs[0].parent


def read(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def write(path: Path, data: Any) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def edit(path: Path, change: Any) -> None:
    data = read(path)
    change(data)
    write(path, data)


def load(root: Path, environ: dict[str, str] | None = None) -> Any:
    return load_policy(root / "tenants", root / "policies", environ=environ or {})


def issues(root: Path, environ: dict[str, str] | None = None) -> list[PolicyIssue]:
    with pytest.raises(PolicyError) as info:
        load(root, environ)
    return list(info.value.issues)


def find(found: list[PolicyIssue], file_name: str, key_path: str) -> PolicyIssue:
    for issue in found:
        if Path(issue.file).name == file_name and issue.key_path == key_path:
            return issue
    raise AssertionError(f"no issue at {file_name}:{key_path} in {[i.format() for i in found]}")


# --- the shipped examples ----------------------------------------------------------


def test_shipped_examples_load() -> None:
    policy = load(REPO)
    assert set(policy.tenants) == {"acme", "globex", "initech"}
    acme, globex, initech = (policy.tenant(t) for t in ("acme", "globex", "initech"))
    assert acme is not None and globex is not None and initech is not None
    assert (acme.tier, acme.enabled) == ("standard", True)
    assert (globex.tier, initech.enabled) == ("free", False)
    assert [m.name for m in policy.models_for(acme)] == ["smollm2", "smollm2-small"]
    assert [m.name for m in policy.models_for(globex)] == ["smollm2-small"]
    assert initech.all_models and policy.allows_model(initech, "smollm2")
    assert policy.allows_model(globex, "smollm2-small")
    assert not policy.allows_model(globex, "smollm2")
    assert policy.model_for(globex, "smollm2") is None
    assert not policy.allows_model(acme, "gpt-4")

    large = policy.model_for(acme, "smollm2")
    small = policy.model_for(acme, "smollm2-small")
    assert large is not None and small is not None
    assert (large.tier, small.tier) == ("large", "small")
    assert large.upstream_model == small.upstream_model == "smollm2"
    assert large.pool is small.pool is policy.pools["local"]
    assert large.pool.kind == "tollgate"
    assert [r.url for r in large.pool.replicas] == ["http://127.0.0.1:8081"]
    assert large.pool.timeouts.connect_s == 2

    assert (
        policy.priority_classes["interactive"].priority < policy.priority_classes["batch"].priority
    )
    assert globex.allowed_priorities == ("standard", "batch")

    price = policy.pricing.price_for("smollm2", date(2025, 6, 1))
    assert price is not None and price.input_per_million == Decimal("0.2")
    assert policy.pricing.price_for("smollm2", date(2024, 12, 31)) is None
    assert policy.pricing.currency == "USD"


def test_limits_merge_model_overrides_and_apps() -> None:
    acme = load(REPO).tenant("acme")
    assert acme.limits.for_model("smollm2").tokens_per_minute == 100000
    assert acme.limits.for_model("smollm2").requests_per_minute == 600
    assert acme.limits.for_model("smollm2-small").tokens_per_minute == 200000
    nightly = acme.app_limits("nightly-summaries", "smollm2")
    assert nightly is not None and nightly.tokens_per_minute == 50000
    assert nightly.tokens_per_day == 10000000
    assert acme.app_limits("unknown-app", "smollm2") is None
    assert acme.app_limits(None, "smollm2") is None


def test_validate_paths_on_shipped_files() -> None:
    assert validate_paths() == []
    assert validate_paths([REPO / "tenants" / "acme.yaml"]) == []
    assert validate_paths([REPO / "policies" / "pricing.yaml"]) == []
    assert validate_paths([REPO / "policies", REPO / "tenants"]) == []


def test_validate_paths_reports_issues(tree: Path) -> None:
    edit(tree / "tenants" / "globex.yaml", lambda d: d.update(tier="platinum"))
    found = validate_paths([tree / "tenants"])
    assert find(found, "globex.yaml", "tier")
    found = validate_paths([tree / "tenants" / "globex.yaml", tree / "policies"])
    assert [Path(i.file).name for i in found] == ["globex.yaml"]
    assert validate_paths([tree / "missing"])[0].message == "no such file or directory"


def test_version_is_a_content_hash(tree: Path) -> None:
    first = load(tree)
    assert load(tree).version == first.version
    # A comment changes nothing that takes effect.
    with (tree / "tenants" / "acme.yaml").open("a") as f:
        f.write("# a note\n")
    assert load(tree).version == first.version
    edit(tree / "tenants" / "acme.yaml", lambda d: d.update(display_name="ACME Inc."))
    assert load(tree).version != first.version


# --- each error kind, with file and key path ---------------------------------------------


def test_yaml_syntax_error_has_line(tree: Path) -> None:
    (tree / "tenants" / "globex.yaml").write_text(
        "id: globex\ndisplay_name: Globex\ntier: free\nallowed_models: [smollm2-small\n"
    )
    found = issues(tree)
    issue = next(i for i in found if Path(i.file).name == "globex.yaml")
    assert "YAML syntax error" in issue.message
    assert issue.line is not None and issue.line >= 4
    assert f"globex.yaml:{issue.line}" in issue.format()


def test_duplicate_key_in_one_file(tree: Path) -> None:
    path = tree / "tenants" / "globex.yaml"
    path.write_text(path.read_text() + "tier: enterprise\n")
    issue = next(i for i in issues(tree) if Path(i.file).name == "globex.yaml")
    assert "duplicate key 'tier'" in issue.message
    assert issue.line == len(path.read_text().splitlines())


def test_unknown_keys(tree: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["colour"] = "blue"
        d["limits"]["tokens_per_minutes"] = 5

    edit(tree / "tenants" / "acme.yaml", change)
    found = issues(tree)
    assert find(found, "acme.yaml", "colour").message == "unknown key"
    nested = find(found, "acme.yaml", "limits.tokens_per_minutes")
    assert nested.message == "unknown key" and nested.line is not None


def test_unknown_policy_key_points_at_its_file(tree: Path) -> None:
    edit(tree / "policies" / "models.yaml", lambda d: d["models"]["smollm2"].update(gpus=2))
    assert find(issues(tree), "models.yaml", "models.smollm2.gpus").message == "unknown key"


def test_wrong_types(tree: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["enabled"] = "yes"
        d["limits"]["requests_per_minute"] = "60"
        d["limits"]["max_concurrent"] = -1
        d["allowed_models"] = "smollm2"

    edit(tree / "tenants" / "acme.yaml", change)
    found = issues(tree)
    assert "bool" in find(found, "acme.yaml", "enabled").message
    assert "integer" in find(found, "acme.yaml", "limits.requests_per_minute").message
    assert "greater than 0" in find(found, "acme.yaml", "limits.max_concurrent").message
    assert "list" in find(found, "acme.yaml", "allowed_models").message


def test_missing_required_key(tree: Path) -> None:
    edit(tree / "tenants" / "acme.yaml", lambda d: d.pop("tier"))
    assert find(issues(tree), "acme.yaml", "tier").message == "required key is missing"


def test_tenant_id_must_match_file_stem(tree: Path) -> None:
    edit(tree / "tenants" / "globex.yaml", lambda d: d.update(id="globex-corp"))
    issue = find(issues(tree), "globex.yaml", "id")
    assert "globex-corp" in issue.message and "'globex'" in issue.message


def test_tenant_model_must_exist(tree: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["allowed_models"] = ["smollm2", "gpt-17"]
        d["limits"]["model_overrides"]["llama-9"] = {"tokens_per_minute": 5}

    edit(tree / "tenants" / "acme.yaml", change)
    found = issues(tree)
    assert "gpt-17" in find(found, "acme.yaml", "allowed_models[1]").message
    assert "llama-9" in find(found, "acme.yaml", "limits.model_overrides.llama-9").message


def test_default_priority_must_be_allowed(tree: Path) -> None:
    edit(tree / "tenants" / "globex.yaml", lambda d: d.update(default_priority="interactive"))
    issue = find(issues(tree), "globex.yaml", "default_priority")
    assert "not in allowed_priorities" in issue.message


def test_unknown_priority_class(tree: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["allowed_priorities"] = ["realtime", "standard"]

    edit(tree / "tenants" / "globex.yaml", change)
    issue = find(issues(tree), "globex.yaml", "allowed_priorities[0]")
    assert "unknown priority class 'realtime'" in issue.message


def test_pricing_missing_a_model(tree: Path) -> None:
    edit(tree / "policies" / "pricing.yaml", lambda d: d["prices"].pop("smollm2-small"))
    issue = find(issues(tree), "pricing.yaml", "prices")
    assert "smollm2-small" in issue.message


def test_price_for_unknown_model_and_unknown_pool(tree: Path) -> None:
    edit(
        tree / "policies" / "pricing.yaml",
        lambda d: d["prices"].update(ghost=d["prices"]["smollm2"]),
    )
    edit(tree / "policies" / "models.yaml", lambda d: d["models"]["smollm2"].update(pool="gpu"))
    found = issues(tree)
    assert "ghost" in find(found, "pricing.yaml", "prices.ghost").message
    assert "unknown pool 'gpu'" in find(found, "models.yaml", "models.smollm2.pool").message


def test_duplicate_top_level_keys(tree: Path) -> None:
    write(tree / "policies" / "zz-extra.yaml", {"currency": "EUR"})
    issue = find(issues(tree), "zz-extra.yaml", "currency")
    assert "pricing.yaml" in issue.message


def test_split_policy_files_merge(tree: Path) -> None:
    pricing = read(tree / "policies" / "pricing.yaml")
    (tree / "policies" / "pricing.yaml").unlink()
    write(tree / "policies" / "a-currency.yaml", {"currency": pricing["currency"]})
    write(tree / "policies" / "b-prices.yaml", {"prices": pricing["prices"]})
    assert load(tree).pricing.price_for("smollm2-small", date(2026, 1, 1)) is not None


def test_env_expansion_error(tree: Path) -> None:
    edit(
        tree / "policies" / "models.yaml",
        lambda d: d["pools"]["local"]["replicas"][0].update(url="http://${BACKEND_HOST}:8081"),
    )
    issue = find(issues(tree), "models.yaml", "pools.local.replicas[0].url")
    assert "BACKEND_HOST" in issue.message and issue.line is not None


def test_multiple_errors_all_reported(tree: Path) -> None:
    edit(tree / "tenants" / "acme.yaml", lambda d: d.update(tier="gold", colour="red"))
    edit(tree / "tenants" / "globex.yaml", lambda d: d.update(allowed_models=["nope"]))
    (tree / "tenants" / "initech.yaml").write_text("id: [unclosed\n")
    edit(tree / "policies" / "pricing.yaml", lambda d: d["prices"].pop("smollm2"))
    with pytest.raises(PolicyError) as info:
        load(tree)
    found = list(info.value.issues)
    find(found, "acme.yaml", "tier")
    find(found, "acme.yaml", "colour")
    find(found, "globex.yaml", "allowed_models[0]")
    find(found, "initech.yaml", "")
    find(found, "pricing.yaml", "prices")
    assert len(found) == 5
    report = info.value.format()
    assert "5 issue" in report and report.count("\n") == 5
    assert set(map(lambda f: Path(f).name, info.value.files())) == {
        "acme.yaml",
        "globex.yaml",
        "initech.yaml",
        "pricing.yaml",
    }


def test_bad_pool_values(tree: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["pools"]["local"]["kind"] = "triton"
        d["pools"]["local"]["replicas"] = [{"url": "not a url", "weight": 1}]

    edit(tree / "policies" / "models.yaml", change)
    found = issues(tree)
    find(found, "models.yaml", "pools.local.kind")
    find(found, "models.yaml", "pools.local.replicas[0].url")


# --- env expansion ------------------------------------------------------------


def test_env_expansion_in_shipped_pool(tree: Path) -> None:
    policy = load(tree, {"TOLLGATE_BACKEND_URL": "http://gpu-1:9000"})
    assert policy.pools["local"].replicas[0].url == "http://gpu-1:9000"
    assert load(tree, {}).pools["local"].replicas[0].url == "http://127.0.0.1:8081"
    # The value in effect is part of the version.
    assert load(tree, {}).version != policy.version


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${A}", {"A": "x"}, "x"),
        ("pre-${A}-post", {"A": "x"}, "pre-x-post"),
        ("${A:-dflt}", {}, "dflt"),
        ("${A:-dflt}", {"A": ""}, "dflt"),
        ("${A:-}", {}, ""),
        ("${A}", {"A": ""}, ""),
        ("$${A}", {}, "${A}"),
        ("${A}${B:-b}", {"A": "a"}, "ab"),
        ("no refs $ here", {}, "no refs $ here"),
    ],
)
def test_expand_env(text: str, env: dict[str, str], expected: str) -> None:
    assert expand_env(text, env) == expected


def test_expand_env_errors() -> None:
    with pytest.raises(KeyError):
        expand_env("${MISSING}", {})
    with pytest.raises(ValueError, match="bad variable"):
        expand_env("${1BAD}", {})


# --- JSON Schemas ---------------------------------------------------------------


def test_json_schemas_do_not_drift() -> None:
    # Regenerate with: python -m gateway.policy.schema_export
    for name, content in render_json_schemas().items():
        on_disk = (REPO / "docs" / "schemas" / name).read_text()
        assert on_disk == content, f"docs/schemas/{name} is stale"


def test_write_json_schemas(tmp_path: Path) -> None:
    written = write_json_schemas(tmp_path)
    assert sorted(p.name for p in written) == ["policy.schema.json", "tenant.schema.json"]
    assert json.loads((tmp_path / "schemas" / "tenant.schema.json").read_text())["title"]


def test_shipped_files_satisfy_json_schemas() -> None:
    tenant_schema = tenant_json_schema()
    for path in (REPO / "tenants").glob("*.yaml"):
        jsonschema.validate(read(path), tenant_schema)
    policy_schema = policy_json_schema()
    for path in (REPO / "policies").glob("*.yaml"):
        data = json.loads(json.dumps(read(path), default=str))
        jsonschema.validate(data, policy_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**read(REPO / "tenants" / "acme.yaml"), "colour": 1}, tenant_schema)
