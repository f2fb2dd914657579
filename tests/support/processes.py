"""Real processes for tests: redis-server, the backend, the gateway."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import cast

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll `url` until it answers 200; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} was ready")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout_s} s: {last}")


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RedisServer:
    """A private redis-server on a random port that tests may stop and restart."""

    def __init__(self, *, appendonly: bool = False) -> None:
        """`appendonly`: persist every write to an append-only file (fsync
        every second), so a restart keeps the data; off by default."""
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="tollgate-redis-")
        self.socket_path = Path(self.dir) / "redis.sock"
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """redis:// URL of this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        """unix:// URL of the same server's Unix socket."""
        return f"unix://{self.socket_path}?db=0"

    def start(self) -> None:
        """Start (or restart) on the same port."""
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--unixsocket",
                str(self.socket_path),
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return
            time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def stop(self) -> None:
        """Stop the server (a fault for the code under test)."""
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None

    def restart(self) -> None:
        """Stop, then start again on the same port."""
        self.stop()
        self.start()


class ServiceProcess:
    """A Python service started as `python -m <module> ...` on a random port,
    ready once `ready_path` answers 200; its output goes to a log file."""

    def __init__(
        self,
        module_argv: list[str],
        ready_path: str,
        env: Mapping[str, str] | None = None,
        *,
        cwd: Path = REPO,
    ) -> None:
        """``cwd``: the checkout whose code runs (the module is imported from
        it first); this one unless a benchmark compares another."""
        self.port = free_port()
        self.argv = module_argv
        self.ready_path = ready_path
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        name = module_argv[0]
        self.log_path = Path(tempfile.mkstemp(prefix=f"tollgate-{name}-", suffix=".log")[1])

    @property
    def url(self) -> str:
        """Base URL of the service."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 300) -> None:
        """Start and wait until ready."""
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *self.argv, "--port", str(self.port)],
            cwd=self.cwd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_http(self.url + self.ready_path, timeout_s, self.proc)
        except Exception as exc:
            self.stop()
            tail = self.log_path.read_text()[-4000:]
            raise RuntimeError(f"{self.argv[0]} failed to start:\n{tail}") from exc

    def stop(self) -> None:
        """Terminate the service."""
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None

    def logs(self) -> str:
        """Everything the service printed so far."""
        return self.log_path.read_text()


class BackendProcess(ServiceProcess):
    """`python -m backend` serving the bundled model on CPU."""

    def __init__(self, *args: str, env: Mapping[str, str] | None = None) -> None:
        super().__init__(["backend", *args], "/ready", env)


class GatewayProcess(ServiceProcess):
    """`tollgate gateway` as a subprocess."""

    def __init__(self, env: Mapping[str, str], *args: str, cwd: Path = REPO) -> None:
        super().__init__(["gateway", "gateway", *args], "/healthz", env, cwd=cwd)


class FakeUpstreamProcess(ServiceProcess):
    """`tests/support/fake_upstream.py`: a fast fake backend for faults and
    for measuring the gateway alone."""

    def __init__(self, *args: str) -> None:
        super().__init__(["tests.support.fake_upstream", *args], "/health")


class InProcessGateway:
    """The gateway app under uvicorn in a background thread, on a random port;
    ``tracing`` replaces the tracing its settings configure."""

    def __init__(self, settings: object, *, tracing: object = None) -> None:
        import uvicorn

        from gateway.api.server_protocol import CoalescingHttpToolsProtocol
        from gateway.app import create_app
        from gateway.observe.tracing import Tracing
        from gateway.settings import GatewaySettings

        assert isinstance(settings, GatewaySettings)
        self.port = free_port()
        config = uvicorn.Config(
            create_app(settings, tracing=cast(Tracing | None, tracing)),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
            http=CoalescingHttpToolsProtocol,  # as `tollgate gateway` serves
            proxy_headers=False,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        """Base URL of the gateway."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Run the server and wait until it answers."""
        self.thread.start()
        wait_http(f"{self.url}/healthz", 30)

    def stop(self) -> None:
        """Ask uvicorn to exit and wait for the thread."""
        self.server.should_exit = True
        self.thread.join(10)


@contextlib.contextmanager
def running(
    proc: RedisServer | ServiceProcess | InProcessGateway,
) -> Iterator[None]:
    """Start `proc` for the duration of a with-block."""
    proc.start()
    try:
        yield
    finally:
        proc.stop()
