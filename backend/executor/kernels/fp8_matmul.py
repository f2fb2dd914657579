"""FP8 matmul through `torch._scaled_mm`: e4m3 weights and activations, bf16 out.

The weight is `backend.executor.quant`'s: `float8_e4m3fn` `[out, in]` with one float32
scale per output row (`amax / 448`). Each call quantizes the activations the same
way, one scale per token (row), so an outlier token does not flatten the others;
`_scaled_mm` multiplies the two e4m3 matrices on Hopper's FP8 tensor cores,
applies `scale_a[m] * scale_b[n]` to each output and adds the bias, in bf16.
`fp8_linear_reference` is the same product with both operands dequantized to
float32, which is what the GPU path is checked against.

Row-wise scales need bf16 output and, on CUDA, compute capability 9.0 (Hopper) or
newer; both inner dimensions must be multiples of 16. Elsewhere `Fp8Linear` keeps
its weight-only path (upcast the weight, multiply, scale the outputs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from backend.executor.kernels import device_capability

FP8_MAX = 448.0
SCALED_MM_MIN_CAPABILITY = (9, 0)
SCALED_MM_ALIGNMENT = 16


def scaled_mm_supported(device: torch.device) -> bool:
    """True on CUDA devices whose FP8 tensor cores `_scaled_mm` can use row-wise."""
    return device_capability(device) >= SCALED_MM_MIN_CAPABILITY


def scaled_mm_shapes_ok(in_features: int, out_features: int) -> bool:
    """True when both matrix dimensions meet `_scaled_mm`'s alignment."""
    return in_features % SCALED_MM_ALIGNMENT == 0 and out_features % SCALED_MM_ALIGNMENT == 0


def quantize_rows_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """`[M, K]` -> (e4m3 `[M, K]`, float32 scales `[M, 1]`), one scale per row."""
    xf = x.float()
    scale = (xf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fp8_scaled_mm(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None = None
) -> Tensor:
    """`x` `[M, K]` bf16 times the e4m3 `weight` `[N, K]` transposed -> `[M, N]` bf16."""
    xq, x_scale = quantize_rows_fp8(x)
    out: Tensor = torch._scaled_mm(
        xq,
        weight.t(),
        scale_a=x_scale,
        scale_b=weight_scale.view(1, -1),
        bias=bias,
        out_dtype=torch.bfloat16,
    )
    return out


def fp8_linear_reference(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None = None
) -> Tensor:
    """The same product in float32 from the dequantized operands, cast to bf16."""
    xq, x_scale = quantize_rows_fp8(x)
    a = xq.float() * x_scale
    b = weight.float() * weight_scale.float().unsqueeze(1)
    out = a @ b.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(torch.bfloat16)
