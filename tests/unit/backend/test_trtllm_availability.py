"""The one-line reasons `--engine tensorrt_llm` gives when TensorRT-LLM cannot be used."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import pytest

from backend.engine.trtllm import availability
from backend.engine.trtllm.availability import EngineUnavailableError, require_tensorrt_llm


def test_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EngineUnavailableError) as info:
        require_tensorrt_llm()
    message = str(info.value)
    assert "\n" not in message
    assert "not installed" in message and availability.RELEASE_IMAGE in message


def test_installed_but_no_cuda_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_import(name: str) -> ModuleType:
        raise OSError("libcuda.so.1: cannot open shared object file: No such file\nsecond line")

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(importlib, "import_module", broken_import)
    with pytest.raises(EngineUnavailableError) as info:
        require_tensorrt_llm()
    message = str(info.value)
    assert "\n" not in message
    assert "importing tensorrt_llm failed (libcuda.so.1: cannot open shared object file" in message
    assert "NVIDIA GPU" in message and availability.RELEASE_IMAGE in message


def test_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(importlib, "import_module", lambda name: ModuleType(name))
    require_tensorrt_llm()
