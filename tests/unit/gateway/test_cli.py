"""The `tollgate` command: every subcommand answers --help; mint and validate work."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import jwt
import pytest

from tests.support.processes import REPO

SUBCOMMANDS = [
    ["up"],
    ["gateway"],
    ["backend"],
    ["token", "mint"],
    ["policy", "validate"],
    ["route", "eval"],
    ["usage", "export"],
]


def tollgate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=lambda w: " ".join(w))
def test_every_subcommand_has_help(words: list[str]) -> None:
    done = tollgate(*words, "--help")
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout.lower()


def test_backend_help_documents_the_engine_settings() -> None:
    out = tollgate("backend", "--help").stdout
    for flag in (
        "--max-num-seqs",
        "--max-num-batched-tokens",
        "--block-size",
        "--kv-cache-bytes",
        "--num-kv-blocks",
        "--max-model-len",
        "--dtype",
        "--device",
        "--quant",
    ):
        assert flag in out


def test_token_mint_signs_with_the_configured_key(tmp_path: Path) -> None:
    secret = "x" * 40
    env = {"PATH": "/usr/bin:/bin", "TOLLGATE_JWT_HS_SECRET": secret, "HOME": str(tmp_path)}
    done = tollgate(
        "token",
        "mint",
        "--tenant",
        "acme",
        "--app",
        "web",
        "--role",
        "admin",
        "--ttl",
        "60",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    claims = jwt.decode(done.stdout.strip(), secret, algorithms=["HS256"], audience="tollgate")
    assert claims["tenant"] == "acme"
    assert claims["app"] == "web"
    assert claims["roles"] == ["admin"]
    assert claims["exp"] - claims["iat"] == 60


def test_token_mint_without_a_key_uses_a_private_development_key(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    first = tollgate("token", "mint", "--tenant", "acme", env=env).stdout.strip()
    key_file = tmp_path / "tollgate" / "dev-jwt-secret"
    assert key_file.stat().st_mode & 0o077 == 0
    key = key_file.read_text()
    assert jwt.decode(first, key, algorithms=["HS256"], audience="tollgate")["tenant"] == "acme"
    second = tollgate("token", "mint", "--tenant", "acme", env=env).stdout.strip()
    assert jwt.decode(second, key, algorithms=["HS256"], audience="tollgate")


def test_policy_validate_accepts_the_shipped_files() -> None:
    done = tollgate("policy", "validate")
    assert done.returncode == 0, done.stderr


def test_policy_validate_reports_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "tenants"
    bad.mkdir()
    (bad / "acme.yaml").write_text((REPO / "tenants" / "acme.yaml").read_text() + "colour: red\n")
    done = tollgate("policy", "validate", str(bad), str(REPO / "policies"))
    assert done.returncode == 1
    assert "acme.yaml" in done.stderr
    assert "colour" in done.stderr


def test_base_install_pulls_no_torch() -> None:
    requirements = importlib.metadata.requires("tollgate") or []
    base = [r for r in requirements if "extra ==" not in r]
    assert base, "the gateway has dependencies"
    assert not any(r.lower().startswith(("torch", "transformers", "gguf")) for r in base)
    torch_reqs = [r for r in requirements if r.lower().startswith("torch")]
    assert torch_reqs and all('extra == "backend"' in r for r in torch_reqs)


def test_gateway_refuses_several_workers_with_the_memory_store(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "TOLLGATE_JWT_HS_SECRET": "x" * 40,
        "TOLLGATE_STORE": "memory",
    }
    done = tollgate("gateway", "--workers", "2", "--port", "0", env=env)
    assert done.returncode == 2
    assert "TOLLGATE_STORE=redis" in done.stderr


def test_route_eval_reports_the_classifier_on_the_shipped_set() -> None:
    done = tollgate("route", "eval")
    assert done.returncode == 0, done.stderr
    figures = dict(line.rsplit(None, 1) for line in done.stdout.splitlines() if line.endswith("%"))
    assert float(figures["accuracy"].rstrip("%")) >= 85
    assert float(figures["recall (large)"].rstrip("%")) >= 95
    assert "sent to small" in figures and "precision (large)" in figures
