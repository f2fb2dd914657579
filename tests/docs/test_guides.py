"""The guides' shell commands, run as written.

Convention (the guides follow it; this test enforces it):

- A fenced block with the info string ``bash`` whose previous non-blank line is
  ``<!-- test: run -->`` is *runnable*: it works offline, with nothing running
  beforehand (a block that needs a gateway starts one, in front of the
  repository's stand-in backend ``tests/support/fake_upstream.py``, and stops
  it before it ends).
- A fenced ``text`` block preceded by ``<!-- test: output -->`` is what the
  runnable block before it prints (standard output and error together). Each
  non-blank line of it must appear in that output, in order, as a whole line;
  other lines may come between them. ``...`` inside a line matches any text
  (a token, a timestamp); a line that is only ``...`` stands for lines left out.
- Every other ``bash``, ``sh`` or ``shell`` block (it needs a cluster, Docker,
  Redis, a GPU or a running service) must at least be valid shell: ``bash -n``.

The runnable blocks of one guide run in document order, each as
``bash -euo pipefail <block>``, in one temporary working directory that holds
copies of what they read from the repository (``tenants/``, ``policies/``,
``docs/schemas/`` and ``tests/support/fake_upstream.py``), so a reader runs
them from the repository root. Their environment is minimal: the repository's
``.venv/bin`` first on ``PATH``, a scratch ``HOME`` shared by the guide's blocks
(the development key and the default ledger folder live under it), and free
ports in ``TOLLGATE_PORT`` and ``TOLLGATE_BACKEND_PORT``, which the blocks read
with the usual defaults (``${TOLLGATE_PORT:-8080}``). No ``TOLLGATE_*`` or
``XDG_*`` variable of the caller leaks in. After each block its whole process
group is killed, so a failing block leaves nothing running.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
GUIDES = (
    DOCS / "operator-guide.md",
    DOCS / "admin-guide.md",
    DOCS / "finance-guide.md",
    DOCS / "api-guide.md",
    DOCS / "architecture.md",
)
RUNNABLE = GUIDES[:4]
"""The guides with runnable blocks (the architecture page has none)."""
SYNTAX_CHECKED = (*GUIDES, REPO / "README.md")
SANDBOX = ("tenants", "policies", "docs/schemas", "tests/support/fake_upstream.py")
SHELL_INFOS = frozenset({"bash", "sh", "shell"})
MARKER = re.compile(r"^\s*<!--\s*test:\s*(\S+)\s*-->\s*$")
MARKERS = frozenset({"run", "output"})
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
BLOCK_TIMEOUT_S = 120


@dataclass
class Block:
    """One fenced code block of a Markdown file."""

    path: Path
    line: int
    """1-based line of the opening fence."""
    info: str
    body: str
    marker: str | None
    expected: Block | None = None
    """For a runnable block: the output block that follows it, if any."""

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    @property
    def runnable(self) -> bool:
        return self.marker == "run"


def parse_blocks(path: Path) -> list[Block]:
    """Every fenced block of `path` with its marker; output blocks are attached
    to the runnable block before them."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    previous = ""
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            if lines[i].strip():
                previous = lines[i]
            i += 1
            continue
        indent, fence, info = opening.groups()
        marker_match = MARKER.match(previous)
        body: list[str] = []
        start = i
        i += 1
        while i < len(lines) and not re.match(rf"^\s*{fence[0]}{{{len(fence)},}}\s*$", lines[i]):
            line = lines[i]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1
        blocks.append(
            Block(
                path,
                start + 1,
                info.lower(),
                "\n".join(body) + "\n",
                marker_match.group(1) if marker_match else None,
            )
        )
        previous = ""
    last_run: Block | None = None
    for block in blocks:
        if block.marker == "run":
            last_run = block
        elif block.marker == "output" and last_run is not None and last_run.expected is None:
            last_run.expected = block
    return blocks


def marker_problems(path: Path) -> list[str]:
    """Markers the convention does not allow."""
    problems = []
    blocks = parse_blocks(path)
    text = path.read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), 1):
        found = MARKER.match(line)
        if found and found.group(1) not in MARKERS:
            problems.append(f"{path.name}:{number}: unknown marker {found.group(1)!r}")
    attached = {id(b.expected) for b in blocks if b.expected is not None}
    for block in blocks:
        if block.marker == "run" and block.info not in SHELL_INFOS:
            problems.append(f"{block.where}: a runnable block must be bash, not {block.info!r}")
        if block.marker == "output" and id(block) not in attached:
            problems.append(f"{block.where}: output block without a runnable block before it")
    marked = sum(1 for line in text.splitlines() if MARKER.match(line))
    if marked != sum(1 for b in blocks if b.marker is not None):
        problems.append(f"{path.name}: a marker is not directly followed by a fenced block")
    return problems


def missing_line(expected: str, output: str) -> str | None:
    """The first expected line not found (in order) in `output`, or None."""
    lines = [line.rstrip() for line in output.splitlines()]
    position = 0
    for wanted in expected.splitlines():
        wanted = wanted.rstrip()
        if not wanted.strip() or wanted.strip() == "...":
            continue
        pattern = re.compile(".*".join(re.escape(part) for part in wanted.split("...")))
        for index in range(position, len(lines)):
            if pattern.fullmatch(lines[index]):
                position = index + 1
                break
        else:
            return wanted
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _venv_bin() -> Path:
    candidate = REPO / ".venv" / "bin"
    return candidate if (candidate / "tollgate").exists() else Path(sys.executable).parent


def _environment(home: Path) -> dict[str, str]:
    env = {
        "PATH": f"{_venv_bin()}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TOLLGATE_PORT": str(_free_port()),
        "TOLLGATE_BACKEND_PORT": str(_free_port()),
    }
    if os.environ.get("TMPDIR"):
        env["TMPDIR"] = os.environ["TMPDIR"]
    return env


def _sandbox(root: Path) -> Path:
    work = root / "work"
    for relative in SANDBOX:
        source = REPO / relative
        target = work / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
    return work


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def run_block(block: Block, work: Path, env: dict[str, str], logs: Path) -> tuple[int, str]:
    """Run `block` with bash in `work`; its exit status and combined output."""
    script = logs / f"block-{block.line}.sh"
    script.write_text(block.body, encoding="utf-8")
    output_path = logs / f"block-{block.line}.out"
    with output_path.open("wb") as output:
        proc = subprocess.Popen(
            ["bash", "-euo", "pipefail", str(script)],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            status = proc.wait(timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            status = -1
        finally:
            # Background jobs the block started (and forgot) go with it.
            _kill_group(proc.pid)
            proc.wait()
    return status, output_path.read_text(encoding="utf-8", errors="replace")


def _ids(paths: tuple[Path, ...]) -> list[str]:
    return [p.name for p in paths]


@pytest.mark.parametrize("path", GUIDES, ids=_ids(GUIDES))
def test_guide_exists(path: Path) -> None:
    assert path.is_file(), f"{path} is missing"
    runnable = any(b.runnable for b in parse_blocks(path))
    assert runnable == (path in RUNNABLE), f"{path.name}: runnable blocks {runnable}"


@pytest.mark.parametrize("path", SYNTAX_CHECKED, ids=_ids(SYNTAX_CHECKED))
def test_markers_follow_the_convention(path: Path) -> None:
    assert marker_problems(path) == []


@pytest.mark.parametrize("path", SYNTAX_CHECKED, ids=_ids(SYNTAX_CHECKED))
def test_other_shell_blocks_are_valid_shell(path: Path) -> None:
    failures = []
    for block in parse_blocks(path):
        if block.info not in SHELL_INFOS or block.runnable:
            continue
        proc = subprocess.run(
            ["bash", "-n"], input=block.body, capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            failures.append(f"{block.where}: {proc.stderr.strip()}")
    assert failures == []


@pytest.mark.parametrize("path", RUNNABLE, ids=_ids(RUNNABLE))
def test_runnable_blocks(path: Path, tmp_path: Path) -> None:
    blocks = [b for b in parse_blocks(path) if b.runnable]
    home = tmp_path / "home"
    home.mkdir()
    logs = tmp_path / "blocks"
    logs.mkdir()
    work = _sandbox(tmp_path)
    env = _environment(home)
    for block in blocks:
        status, output = run_block(block, work, env, logs)
        tail = output[-4000:]
        assert status == 0, (
            f"{block.where} exited with {status}"
            f"{' (timed out)' if status == -1 else ''}:\n{block.body}\n--- output ---\n{tail}"
        )
        if block.expected is not None:
            missing = missing_line(block.expected.body, output)
            assert missing is None, (
                f"{block.where}: expected line not in the output (in order): {missing!r}\n"
                f"--- output ---\n{tail}"
            )


# --- the checker itself -------------------------------------------------------------


def test_missing_line_matches_in_order_with_wildcards() -> None:
    output = "first\nsecond 123\nthird\n"
    assert missing_line("first\n...\nthird\n", output) is None
    assert missing_line("second ...\n", output) is None
    assert missing_line("third\nfirst\n", output) == "first"
    assert missing_line("second\n", output) == "second"


def test_parse_blocks_attaches_output_to_the_runnable_block(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Text.\n\n<!-- test: run -->\n```bash\necho hi\n```\n\n"
        "<!-- test: output -->\n```text\nhi\n```\n\n```bash\nkubectl apply -k .\n```\n",
        encoding="utf-8",
    )
    blocks = parse_blocks(page)
    assert [(b.info, b.marker) for b in blocks] == [
        ("bash", "run"),
        ("text", "output"),
        ("bash", None),
    ]
    assert blocks[0].expected is blocks[1]
    assert blocks[0].body == "echo hi\n"
    assert marker_problems(page) == []
