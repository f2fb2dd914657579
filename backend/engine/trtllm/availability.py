"""Whether TensorRT-LLM can be used here, said in one line when it cannot."""

from __future__ import annotations

import importlib
import importlib.util

RELEASE_IMAGE = "nvcr.io/nvidia/tensorrt-llm/release:<tag>"
NOT_INSTALLED = (
    "--engine tensorrt_llm needs TensorRT-LLM, which is not installed here; "
    f"run the backend in NVIDIA's TensorRT-LLM release image ({RELEASE_IMAGE}), "
    "see docs/tensorrt-llm.md (the tensorrt-llm package on PyPI only fetches the "
    "real wheel from NVIDIA's own index)"
)


class EngineUnavailableError(RuntimeError):
    """The chosen engine cannot run on this machine; the message says how to get it."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def require_tensorrt_llm() -> None:
    """Import `tensorrt_llm` once, or raise EngineUnavailableError with a one-line reason.

    Importing it needs an NVIDIA GPU and its CUDA driver, so an install that is
    present but cannot load is reported as such rather than as a traceback.
    """
    if importlib.util.find_spec("tensorrt_llm") is None:
        raise EngineUnavailableError(NOT_INSTALLED)
    try:
        importlib.import_module("tensorrt_llm")
    except Exception as exc:  # ImportError, OSError (libcuda), RuntimeError (no GPU)
        raise EngineUnavailableError(
            f"--engine tensorrt_llm: importing tensorrt_llm failed ({_first_line(exc)}); "
            f"it needs an NVIDIA GPU with its CUDA driver, as in NVIDIA's TensorRT-LLM "
            f"release image ({RELEASE_IMAGE}), see docs/tensorrt-llm.md"
        ) from exc
