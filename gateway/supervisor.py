"""`tollgate up`: a backend and a gateway as child processes, stopped together.

Children get SIGTERM when this process dies for any reason (Linux
PR_SET_PDEATHSIG), and on Ctrl-C or SIGTERM they are terminated, then killed
after a grace period, so nothing is left behind.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass


@dataclass
class Child:
    """A started child process and how to tell it is ready."""

    name: str
    process: subprocess.Popen[bytes]
    ready_url: str


def spawn(name: str, argv: Sequence[str], env: Mapping[str, str], ready_url: str) -> Child:
    """Start a child that dies with this process."""
    process = subprocess.Popen(list(argv), env=dict(env), preexec_fn=_die_with_parent)
    return Child(name, process, ready_url)


def wait_ready(child: Child, timeout_s: float) -> None:
    """Poll the child's readiness URL; raise if it exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = child.process.poll()
        if code is not None:
            raise RuntimeError(f"{child.name} exited with status {code} before it was ready")
        try:
            with urllib.request.urlopen(child.ready_url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError, TimeoutError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{child.name} was not ready within {timeout_s:.0f} s")


def stop_all(children: Sequence[Child], grace_s: float = 10.0) -> None:
    """SIGTERM every child, then SIGKILL the ones still alive after `grace_s`."""
    for child in children:
        if child.process.poll() is None:
            child.process.terminate()
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()


def watch(children: Sequence[Child]) -> int:
    """Block until a child exits or a stop signal arrives; stop the rest."""
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stopping:
            for child in children:
                code = child.process.poll()
                if code is not None:
                    print(f"tollgate up: {child.name} exited with status {code}", file=sys.stderr)
                    return code or 1
            time.sleep(0.2)
        return 0
    finally:
        stop_all(children)
        for s, handler in previous.items():
            signal.signal(s, handler)


def executable_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment plus `extra`."""
    env = dict(os.environ)
    env.update(extra)
    return env
