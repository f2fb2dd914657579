"""`tollgate backend --engine tensorrt_llm` where TensorRT-LLM is not installed.

The command must end at once with one line saying how to get it, never a
traceback. Runs the real command line in a subprocess.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import REPO

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_llm") is not None,
    reason="tensorrt_llm is installed here, so the backend would start instead",
)


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 8192}))
    return tmp_path


def tollgate_script() -> str:
    script = Path(sys.executable).with_name("tollgate")
    if not script.is_file():
        pytest.skip("the tollgate console script is not installed in this environment")
    return str(script)


@pytest.mark.parametrize("entry", ["python -m backend", "tollgate backend"])
def test_missing_tensorrt_llm_is_one_line_naming_the_release_image(
    entry: str, checkpoint: Path
) -> None:
    command = (
        [sys.executable, "-m", "backend"]
        if entry == "python -m backend"
        else [tollgate_script(), "backend"]
    )
    result = run(*command, "--engine", "tensorrt_llm", "--model", str(checkpoint))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    line = lines[0]
    assert line.startswith("tollgate backend: --engine tensorrt_llm needs TensorRT-LLM")
    assert "nvcr.io/nvidia/tensorrt-llm/release" in line
    assert result.stdout == ""


def test_tensorrt_llm_without_a_checkpoint_is_a_usage_error() -> None:
    result = run(sys.executable, "-m", "backend", "--engine", "tensorrt_llm")
    assert result.returncode == 2
    assert "needs --model" in result.stderr
    assert "Traceback" not in result.stderr
