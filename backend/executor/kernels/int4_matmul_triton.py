# Kernel signatures are read by Triton's compiler, which takes annotations as
# specialisation hints, so the @triton.jit functions stay unannotated.
# mypy: disable-error-code="untyped-decorator,no-untyped-def"
"""Triton kernel: `x @ W.T` with `W` stored as packed group-wise int4 (see `int4_matmul`).

Each program computes a `[BLOCK_M, BLOCK_N]` tile of the output. Per K step it loads
`BLOCK_N x BLOCK_K / 2` bytes of packed weight, splits the nibbles, interleaves
them back into column order, applies each group's scale and minimum in float32,
casts to the activations' dtype and accumulates `tl.dot` in float32. Importing this
module imports Triton: only `int4_matmul.int4_matmul` (on CUDA) and the self-check do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from backend.executor.kernels.int4_matmul import int4_launch_config


@triton.jit
def _int4_matmul_kernel(
    x_ptr,
    packed_ptr,
    scales_ptr,
    mins_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_pn,
    stride_sn,
    stride_om,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    halves = tl.arange(0, BLOCK_K // 2)
    groups = tl.arange(0, BLOCK_K // GROUP_SIZE)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    w_rows = packed_ptr + cols.to(tl.int64)[:, None] * stride_pn
    s_rows = cols.to(tl.int64)[:, None] * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_rows + (k0 + ks)[None, :], mask=row_ok[:, None], other=0.0)
        packed = tl.load(w_rows + (k0 // 2 + halves)[None, :], mask=col_ok[:, None], other=0)
        # join -> [BLOCK_N, BLOCK_K // 2, 2]; row-major reshape puts the low nibble
        # of byte j at column 2j and the high nibble at 2j + 1, the packing order.
        q = tl.join(packed & 0x0F, packed >> 4).reshape(BLOCK_N, BLOCK_K)
        group = k0 // GROUP_SIZE + groups
        scale = tl.load(scales_ptr + s_rows + group[None, :], mask=col_ok[:, None], other=0.0)
        low = tl.load(mins_ptr + s_rows + group[None, :], mask=col_ok[:, None], other=0.0)
        w = q.to(tl.float32).reshape(BLOCK_N, BLOCK_K // GROUP_SIZE, GROUP_SIZE)
        w = w * scale[:, :, None] + low[:, :, None]
        w = w.reshape(BLOCK_N, BLOCK_K).to(x.dtype)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def int4_matmul_triton(
    x: Tensor, packed: Tensor, scales: Tensor, mins: Tensor, group_size: int
) -> Tensor:
    """`x` `[M, K]` times the int4 weight `[N, K]` transposed -> `[M, N]` in `x.dtype`."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, in_features = x.shape
    out_features = packed.shape[0]
    config = int4_launch_config(rows, in_features, group_size)
    out = torch.empty((rows, out_features), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(rows, config.block_m), triton.cdiv(out_features, config.block_n))
    _int4_matmul_kernel[grid](
        x,
        packed,
        scales,
        mins,
        out,
        rows,
        out_features,
        in_features,
        x.stride(0),
        packed.stride(0),
        scales.stride(0),
        out.stride(0),
        GROUP_SIZE=group_size,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        IEEE=x.dtype == torch.float32,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out
