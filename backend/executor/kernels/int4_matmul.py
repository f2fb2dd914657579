"""Group-wise int4 weight-only matmul: the reference, the launch heuristics, the dispatch.

The weight format is `backend.executor.quant`'s: `packed` `[out, in // 2]` uint8 with
even input columns in the low nibble and odd ones in the high nibble, `scales` and
`mins` `[out, in // group_size]` float32, and `w = q * scale + min` computed in float32
before the cast to the activations' dtype. The Triton kernel
(`int4_matmul_triton`) dequantizes one tile of the weight at a time in registers and
multiplies it on tensor cores, so it reads 4 bits per weight from memory instead of
a whole dequantized matrix; `int4_matmul_reference` is the same product through an
explicitly dequantized weight and `F.linear`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from backend.executor.kernels import triton_kernels_supported

CUDA_INT4_KERNEL_MAX_ROWS = 64
"""Above this many rows (prefill), dequantizing once and calling cuBLAS is faster."""
INT4_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BLOCK_K_CHOICES = (256, 128, 64, 32)


@dataclass(frozen=True)
class Int4LaunchConfig:
    """Tile sizes of one kernel launch."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def unpack_int4(packed: Tensor) -> Tensor:
    """`[out, in // 2]` uint8 -> `[out, in]` uint8 codes 0..15 (low nibble = even column)."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def int4_matmul_reference(
    x: Tensor, packed: Tensor, scales: Tensor, mins: Tensor, bias: Tensor | None = None
) -> Tensor:
    """`x @ W.T (+ bias)` with `W` dequantized in float32, then cast to `x.dtype`."""
    q = unpack_int4(packed).float()
    out_features, num_groups = scales.shape
    grouped = q.view(out_features, num_groups, -1)
    weight = grouped * scales.float().unsqueeze(-1) + mins.float().unsqueeze(-1)
    return F.linear(x, weight.view(out_features, -1).to(x.dtype), bias)


def int4_launch_config(rows: int, in_features: int, group_size: int) -> Int4LaunchConfig:
    """Tiles for a `[rows, in_features]` input: small row tiles for decode-sized batches.

    The K tile must hold whole groups and divide `in_features` (the kernel has no K
    tail); decode-sized batches take narrow N tiles so even a 4096-wide output
    spreads over every multiprocessor.
    """
    block_k = next(
        k for k in (*BLOCK_K_CHOICES, group_size) if in_features % k == 0 and k % group_size == 0
    )
    if rows <= 16:
        return Int4LaunchConfig(16, 32, block_k, num_warps=4, num_stages=4)
    if rows <= 32:
        return Int4LaunchConfig(32, 64, min(block_k, 128), num_warps=4, num_stages=3)
    return Int4LaunchConfig(64, 64, min(block_k, 128), num_warps=4, num_stages=3)


def int4_kernel_applies(x: Tensor, rows: int) -> bool:
    """True when the Triton kernel should serve this input (CUDA, decode-sized, Triton)."""
    return (
        x.is_cuda
        and rows <= CUDA_INT4_KERNEL_MAX_ROWS
        and x.dtype in INT4_KERNEL_DTYPES
        and triton_kernels_supported(x.device)
    )


def int4_matmul(
    x: Tensor,
    packed: Tensor,
    scales: Tensor,
    mins: Tensor,
    group_size: int,
    bias: Tensor | None = None,
) -> Tensor:
    """`x @ W.T (+ bias)` for `x` `[..., in]`: the Triton kernel on CUDA, else the reference."""
    flat = x.reshape(-1, x.shape[-1])
    if not int4_kernel_applies(x, flat.shape[0]):
        return int4_matmul_reference(x, packed, scales, mins, bias)
    from backend.executor.kernels.int4_matmul_triton import int4_matmul_triton

    y = int4_matmul_triton(flat, packed, scales, mins, group_size)
    y = y.view(*x.shape[:-1], packed.shape[0])
    return y if bias is None else y + bias
