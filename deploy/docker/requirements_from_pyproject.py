"""Print the project's requirements from pyproject.toml, one per line, without
the packages named by --exclude.

The GPU image uses it to install Tollgate's dependencies next to the torch that
the TensorRT-LLM base image ships, which must not be replaced:

    python3 requirements_from_pyproject.py pyproject.toml --extra backend --exclude torch

Standard library only (Python 3.11+), so it runs on any base image.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    """PEP 503 normalized name: `Foo_Bar.baz` -> `foo-bar-baz`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: Path, extras: list[str], exclude: list[str]) -> list[str]:
    """The base requirements plus those of `extras`, minus the `exclude` names."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    found = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"{pyproject}: no optional dependency group {extra!r}")
        found.extend(optional[extra])
    dropped = {canonical(n) for n in exclude}
    out: list[str] = []
    for requirement in found:
        match = _NAME.match(requirement)
        if match is None:
            raise SystemExit(f"{pyproject}: cannot read requirement {requirement!r}")
        if canonical(match.group(1)) not in dropped and requirement not in out:
            out.append(requirement)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--extra", action="append", default=[], help="extra to include")
    parser.add_argument("--exclude", action="append", default=[], help="package to leave out")
    args = parser.parse_args(argv)
    for line in requirements(args.pyproject, args.extra, args.exclude):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
