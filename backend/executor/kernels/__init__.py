"""GPU kernels of the torch engine, each next to the pure-torch reference it must match.

| module | job |
| --- | --- |
| `paged_attention` | attention over the paged KV cache: metadata, CPU reference, dispatch |
| `paged_attention_triton` | the Triton kernel behind it (CUDA) |
| `int4_matmul` | group-wise int4 weight-only matmul: reference, dispatch |
| `int4_matmul_triton` | the Triton kernel behind it (CUDA) |
| `fp8_matmul` | e4m3 weights times per-token e4m3 activations via `torch._scaled_mm` |
| `selfcheck` | runs each kernel against its reference on random inputs |

Triton is imported only inside the `*_triton` modules, and those only when a CUDA
tensor reaches a dispatcher (or a self-check asks for them): the CPU install has
no Triton, and nothing on the CPU path may need it.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

MIN_CAPABILITY = (8, 0)
"""The kernels use bf16 tensor-core dots: Ampere or newer."""


@functools.cache
def triton_available() -> bool:
    """True when the `triton` package can be imported (it is never imported here)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    major, minor = torch.cuda.get_device_capability(index)
    return major, minor


def device_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device; (0, 0) for any other device."""
    if device.type != "cuda":
        return (0, 0)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index)


def triton_kernels_supported(device: torch.device) -> bool:
    """True when this package's Triton kernels can run on `device`."""
    return triton_available() and device_capability(device) >= MIN_CAPABILITY
