"""The Triton kernels against their references in Triton's CPU interpreter.

Runs wherever the `triton` package is importable, GPU or not (the CPU install
has none, so there it skips). The interpreter runs in a child process because it
must be switched on before any kernel module is imported.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_kernels_match_their_references_in_the_interpreter() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "backend.executor.kernels.selfcheck", "--interpret"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout and result.stdout.count("ok ") >= 10
