"""`tollgate up`: the README's first command, from start to Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.support.processes import REPO, free_port


def test_up_prints_a_working_curl_line_and_ctrl_c_leaves_nothing(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "XDG_CONFIG_HOME": str(tmp_path),
        "TOLLGATE_PORT": str(free_port()),
        "TOLLGATE_BACKEND_PORT": str(free_port()),
    }
    for key in list(env):
        if key.startswith("TOLLGATE_JWT_"):
            del env[key]
    up = subprocess.Popen(
        [sys.executable, "-m", "gateway", "up"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert up.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        output = "".join(lines)
        curl = next(line for line in lines if line.startswith("curl "))
        assert re.search(r"development token: \S+\.\S+\.\S+", output)
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 2

        done = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=120)
        body = json.loads(done.stdout)
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"].strip()
        assert body["usage"]["prompt_tokens"] > 0
        assert body["usage"]["completion_tokens"] > 0

        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=30) == 0
        _gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"left behind: {[p.pid for p in alive]}"
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
