"""The guides' reference sections are complete: every setting, flag, policy key,
error code and header the code has is documented, and every link resolves."""

from __future__ import annotations

import argparse
import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
OPERATOR = DOCS / "operator-guide.md"
ADMIN = DOCS / "admin-guide.md"
FINANCE = DOCS / "finance-guide.md"
API = DOCS / "api-guide.md"
ARCHITECTURE = DOCS / "architecture.md"
GUIDES = (OPERATOR, ADMIN, FINANCE, API, ARCHITECTURE)
ENV_SOURCES = ("gateway", "backend", "scripts")
ENV_NAME = re.compile(r"\bTOLLGATE_[A-Z0-9_]*[A-Z0-9]\b")
LINKED_BESIDE = frozenset(
    # Pages kept next to the guides by their own owners; checked once present.
    {"docs/metrics.md", "docs/gpu.md", "docs/tensorrt-llm.md"}
)


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _sources(*roots: str, suffixes: tuple[str, ...] = (".py",)) -> Iterator[Path]:
    for root in roots:
        for path in sorted((REPO / root).rglob("*")):
            if path.suffix in suffixes and "__pycache__" not in path.parts:
                yield path


def _without_code_blocks(text: str) -> str:
    return re.sub(r"^([ \t]*)(`{3,}|~{3,})[^\n]*\n.*?^\1\2[ \t]*$", "", text, flags=re.M | re.S)


def _table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.lstrip().startswith("|")]


# --- environment variables ------------------------------------------------------------


def environment_variables() -> set[str]:
    """Every `TOLLGATE_*` name the gateway, the backend and the scripts mention."""
    names: set[str] = set()
    for path in _sources(*ENV_SOURCES, suffixes=(".py", ".sh")):
        names.update(ENV_NAME.findall(_text(path)))
    return names


def test_every_environment_variable_is_in_the_operator_guide() -> None:
    names = environment_variables()
    assert len(names) > 30  # the scan found the settings
    first_cells = " ".join(row.split("|")[1] for row in _table_rows(_text(OPERATOR)))
    missing = sorted(n for n in names if not re.search(rf"`{n}`", first_cells))
    assert missing == [], "not in a table row of docs/operator-guide.md (first column)"


def test_the_operator_guide_names_no_unknown_variable() -> None:
    known = environment_variables()
    for path in _sources("policies", suffixes=(".yaml",)):
        known.update(ENV_NAME.findall(_text(path)))
    documented = set(ENV_NAME.findall(_text(OPERATOR)))
    assert sorted(documented - known) == []


# --- command-line flags ------------------------------------------------------------------


def _commands() -> dict[str, argparse.ArgumentParser]:
    from backend.main import build_parser as backend_parser
    from gateway.cli import build_parser

    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subparsers:
            found[name] = parser
        for action in subparsers:
            for sub_name, sub in action.choices.items():
                walk(sub, f"{name} {sub_name}")

    walk(build_parser(), "tollgate")
    # `tollgate backend` hands its arguments to the backend's own parser.
    found["tollgate backend"] = backend_parser()
    return found


def _section(text: str, title: str) -> str | None:
    """The body of the heading whose text is exactly `title` in backticks."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        heading = re.match(r"^(#+)\s+(.*?)\s*$", line)
        if heading and heading.group(2) == f"`{title}`":
            depth = len(heading.group(1))
            body = []
            for following in lines[i + 1 :]:
                deeper = re.match(r"^(#+)\s", following)
                if deeper and len(deeper.group(1)) <= depth:
                    break
                body.append(following)
            return "\n".join(body)
    return None


def test_every_command_line_flag_is_in_the_operator_guide() -> None:
    text = _text(OPERATOR)
    missing = []
    for command, parser in sorted(_commands().items()):
        section = _section(text, command)
        if section is None:
            missing.append(f"no section titled `{command}`")
            continue
        for action in parser._actions:
            for flag in action.option_strings:
                if flag in ("-h", "--help"):
                    continue
                if not re.search(rf"`{re.escape(flag)}(?![\w-])", section):
                    missing.append(f"{command} {flag}")
            positional = not action.option_strings
            if positional and action.dest.upper() not in section.upper():
                missing.append(f"{command} {action.dest} (positional)")
    assert missing == []


# --- policy and tenant keys ---------------------------------------------------------------


def schema_properties() -> set[str]:
    """Every property name in docs/schemas/*.schema.json."""
    names: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            properties = node.get("properties")
            if isinstance(properties, dict):
                names.update(properties)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for path in sorted((DOCS / "schemas").glob("*.schema.json")):
        walk(json.loads(_text(path)))
    return names


def test_every_schema_property_is_in_the_admin_guide() -> None:
    names = schema_properties()
    assert {"allowed_models", "max_in_flight", "effective_from"} <= names
    text = _text(ADMIN)
    missing = sorted(n for n in names if f"`{n}`" not in text)
    assert missing == []


# --- error codes -----------------------------------------------------------------------


def _strings(node: ast.AST | None) -> list[str]:
    """String constants a code expression can evaluate to."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.BoolOp):
        return [s for value in node.values for s in _strings(value)]
    if isinstance(node, ast.IfExp):
        return _strings(node.body) + _strings(node.orelse)
    return []


def _call_name(node: ast.Call) -> str | None:
    if isinstance(node.func, ast.Name):
        return node.func.id
    if isinstance(node.func, ast.Attribute):
        return node.func.attr
    return None


def _target_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def gateway_error_codes() -> set[str]:
    """Every error `code` string the gateway can put in an error body.

    Found in the source: `code=` arguments, `default_code` class attributes,
    `error_code` assignments, `"code": ...` dict entries, the `code` property,
    and string arguments passed positionally to a function's `code` parameter.
    """
    trees = [ast.parse(_text(path)) for path in _sources("gateway")]
    positional: dict[str, int] = {}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                params = [a.arg for a in node.args.args]
                if params[:1] in (["self"], ["cls"]):
                    params = params[1:]
                if "code" in params:
                    positional[node.name] = params.index("code")
    codes: list[str] = []
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "code":
                codes += _strings(node.value)
            elif isinstance(node, ast.Call) and _call_name(node) in positional:
                index = positional[_call_name(node) or ""]
                if index < len(node.args):
                    codes += _strings(node.args[index])
            elif isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if isinstance(key, ast.Constant) and key.value == "code":
                        codes += _strings(value)
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                        pairs = list(zip(target.elts, node.value.elts, strict=False))
                    else:
                        pairs = [(target, node.value)]
                    for name, value in pairs:
                        if _target_name(name) in ("default_code", "error_code"):
                            codes += _strings(value)
            elif isinstance(node, ast.FunctionDef) and node.name == "code":
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Return):
                        codes += _strings(inner.value)
    return {c for c in codes if re.fullmatch(r"[a-z][a-z0-9_]*", c)}


def test_every_gateway_error_code_is_in_the_api_guide_with_its_status() -> None:
    codes = gateway_error_codes()
    assert {"missing_token", "queue_full", "insufficient_quota", "internal_error"} <= codes
    rows = _table_rows(_text(API))
    missing = sorted(
        code
        for code in codes
        if not any(f"`{code}`" in row and re.search(r"\b[1-5]\d\d\b", row) for row in rows)
    )
    assert missing == [], "each needs a table row in docs/api-guide.md with its HTTP status"


# --- headers ----------------------------------------------------------------------------


def test_every_header_the_gateway_reads_or_sets_is_in_the_api_guide() -> None:
    names: set[str] = set()
    for path in _sources("gateway"):
        names.update(re.findall(r"\bx-[a-z0-9]+(?:-[a-z0-9]+)*\b(?!-)", _text(path)))
    names = {n for n in names if not n.endswith("-")}
    assert {"x-request-id", "x-ratelimit-remaining-tokens", "x-tollgate-route"} <= names
    text = _text(API)
    assert sorted(n for n in names if f"`{n}`" not in text) == []


# --- links -----------------------------------------------------------------------------


def _slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of `path`."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for line in _without_code_blocks(_text(path)).splitlines():
        heading = re.match(r"^#+\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = _slug(heading.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
        for explicit in re.findall(r'<a (?:name|id)="([^"]+)"', line):
            found.add(explicit)
    return found


LINKING = (*GUIDES, REPO / "README.md", DOCS / "api.md", DOCS / "finance.md")


@pytest.mark.parametrize("path", LINKING, ids=[p.name for p in LINKING])
def test_relative_links_resolve(path: Path) -> None:
    text = re.sub(r"`[^`\n]*`", "", _without_code_blocks(_text(path)))
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        relative = resolved.relative_to(REPO).as_posix() if resolved.is_relative_to(REPO) else ""
        if not resolved.exists():
            if relative not in LINKED_BESIDE:
                broken.append(target)
            continue
        if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(target)
    assert broken == []


def test_the_readme_links_every_guide() -> None:
    text = _text(REPO / "README.md")
    for guide in GUIDES:
        assert f"(docs/{guide.name})" in text, f"README.md does not link docs/{guide.name}"
    # The quick start stays two commands.
    assert "bash scripts/up.sh" in text and "bash scripts/test.sh" in text
