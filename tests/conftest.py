"""Fixtures every test layer shares: real processes, settings and tokens."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import httpx
import pytest

from tests.support.processes import (
    REPO,
    BackendProcess,
    FakeUpstreamProcess,
    GatewayProcess,
    InProcessGateway,
    RedisServer,
)

TEST_SECRET = "tollgate-test-secret-0123456789-abcdefghijklmnop"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Gateways under test (and their child processes) keep the usage ledger's
# default folder out of the user's data directory.
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="tollgate-test-data-")


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server on a random port, stopped after the test."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def backend() -> Iterator[BackendProcess]:
    """One backend process with the bundled model, shared by the session."""
    proc = BackendProcess("--max-model-len", "2048", "--threads", "1")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[FakeUpstreamProcess]:
    """The fast fake backend (tests/support/fake_upstream.py), shared by the session."""
    proc = FakeUpstreamProcess()
    proc.start(timeout_s=60)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def fresh_fake(fake_upstream: FakeUpstreamProcess) -> FakeUpstreamProcess:
    """The shared fake backend with its counters zeroed."""
    httpx.post(f"{fake_upstream.url}/fake/reset", timeout=5)
    return fake_upstream


@pytest.fixture
def policy_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """Private copies of the shipped tenants/ and policies/ a test may edit."""
    tenants = tmp_path / "tenants"
    policies = tmp_path / "policies"
    shutil.copytree(REPO / "tenants", tenants)
    shutil.copytree(REPO / "policies", policies)
    return tenants, policies


def gateway_env(backend_url: str, tenants: Path, policies: Path) -> dict[str, str]:
    """Environment for a gateway in front of `backend_url` with the test key."""
    return {
        "TOLLGATE_BACKEND_URL": backend_url,
        "TOLLGATE_TENANTS_DIR": str(tenants),
        "TOLLGATE_POLICIES_DIR": str(policies),
        "TOLLGATE_JWT_HS_SECRET": TEST_SECRET,
        "TOLLGATE_POLICY_POLL_S": "0.2",
        # The usage ledger beside the test's policy copies, not in the user's data dir.
        "TOLLGATE_LEDGER_DIR": str(tenants.parent / "ledger"),
    }


@pytest.fixture
def mint() -> Callable[..., str]:
    """Mint a token the test gateways accept."""
    from gateway.auth.minting import mint_token
    from gateway.auth.settings import AuthSettings

    settings = AuthSettings(hs_secret=TEST_SECRET)

    def _mint(tenant: str = "acme", **kwargs: object) -> str:
        return mint_token(settings, tenant=tenant, **kwargs)  # type: ignore[arg-type]

    return _mint


StartGateway = Callable[[Mapping[str, str]], InProcessGateway]


@pytest.fixture
def start_gateway(monkeypatch: pytest.MonkeyPatch) -> Iterator[StartGateway]:
    """Start in-process gateways with the settings in `env` (also set in the
    process environment, which the policy files' ${VARS} read); all are
    stopped after the test."""
    from gateway.settings import GatewaySettings

    started: list[InProcessGateway] = []

    def start(env: Mapping[str, str]) -> InProcessGateway:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        gw = InProcessGateway(GatewaySettings.from_env(dict(env)))
        gw.start()
        started.append(gw)
        return gw

    try:
        yield start
    finally:
        for gw in started:
            gw.stop()


@pytest.fixture
def gateway(
    backend: BackendProcess, policy_dirs: tuple[Path, Path], start_gateway: StartGateway
) -> InProcessGateway:
    """The gateway in-process, in front of the shared backend."""
    return start_gateway(gateway_env(backend.url, *policy_dirs))


@pytest.fixture
def gateway_process(
    backend: BackendProcess, policy_dirs: tuple[Path, Path]
) -> Iterator[GatewayProcess]:
    """The gateway as its own process, in front of the shared backend."""
    gw = GatewayProcess(gateway_env(backend.url, *policy_dirs))
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()
