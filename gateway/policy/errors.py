"""Policy load failures, reported as a complete list of issues."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    """One problem in one file: where (file, key path, line if known) and what."""

    file: str
    key_path: str
    message: str
    line: int | None = None

    def format(self) -> str:
        """``file:line: key.path: message``, the form editors and CI logs link."""
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.key_path:
            return f"{where}: {self.key_path}: {self.message}"
        return f"{where}: {self.message}"


class PolicyError(Exception):
    """The policy files do not form a valid policy; ``issues`` lists every problem found."""

    def __init__(self, issues: Iterable[PolicyIssue]) -> None:
        self.issues: tuple[PolicyIssue, ...] = tuple(issues)
        self.at = datetime.now(UTC)
        count = len(self.issues)
        super().__init__(f"{count} policy issue{'s' if count != 1 else ''}")

    def format(self) -> str:
        """A human-readable report, one issue per line."""
        lines = [f"policy rejected: {len(self.issues)} issue(s)"]
        lines.extend(f"  {issue.format()}" for issue in self.issues)
        return "\n".join(lines)

    def files(self) -> tuple[str, ...]:
        """The files named by the issues, each once, in order."""
        return tuple(dict.fromkeys(issue.file for issue in self.issues))
