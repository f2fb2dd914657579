"""The int4 and FP8 GPU formats' math, checked on CPU.

The Triton int4 kernel and `_scaled_mm` are checked against these references on
a GPU (test_cuda_paths.py) and under Triton's interpreter
(test_kernel_interpreter.py); here the references must agree with the CPU
quantization code, and the CPU layers must keep their own paths.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

from backend.executor.kernels.fp8_matmul import (  # noqa: E402
    FP8_MAX,
    fp8_linear_reference,
    fp8_scaled_mm,
    quantize_rows_fp8,
    scaled_mm_shapes_ok,
    scaled_mm_supported,
)
from backend.executor.kernels.int4_matmul import (  # noqa: E402
    CUDA_INT4_KERNEL_MAX_ROWS,
    int4_kernel_applies,
    int4_launch_config,
    int4_matmul,
    int4_matmul_reference,
    unpack_int4,
)
from backend.executor.quant import (  # noqa: E402
    Fp8Linear,
    Int4Linear,
    dequantize_int4,
    quantize_fp8,
    quantize_int4,
)


def _randn(*shape: int, seed: int = 0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_unpack_puts_the_low_nibble_on_even_columns() -> None:
    packed = torch.tensor([[0x21, 0xF0]], dtype=torch.uint8)
    assert unpack_int4(packed).tolist() == [[1, 2, 0, 15]]


@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_reference_equals_dequantize_then_linear(group_size: int, dtype) -> None:
    packed, scales, mins = quantize_int4(_randn(40, 192) * 0.1, group_size)
    x, bias = _randn(5, 192, seed=1).to(dtype), _randn(40, seed=2).to(dtype)
    expected = F.linear(x, dequantize_int4(packed, scales, mins, dtype), bias)
    torch.testing.assert_close(int4_matmul_reference(x, packed, scales, mins, bias), expected)
    # Off CUDA the dispatcher is the reference.
    torch.testing.assert_close(int4_matmul(x, packed, scales, mins, group_size, bias), expected)


@pytest.mark.parametrize("in_features", [576, 1536, 4096, 14336])
@pytest.mark.parametrize("rows", [1, 16, 17, 64])
def test_int4_tiles_hold_whole_groups_and_divide_k(in_features: int, rows: int) -> None:
    for group_size in (32, 64):
        config = int4_launch_config(rows, in_features, group_size)
        assert in_features % config.block_k == 0 and config.block_k % group_size == 0
        assert config.block_m >= min(rows, 16) and config.block_n >= 16


def test_int4_kernel_only_serves_cuda_inputs() -> None:
    x = torch.zeros(1, 64)
    assert not int4_kernel_applies(x, 1)
    assert CUDA_INT4_KERNEL_MAX_ROWS >= 16


def test_activation_scales_are_per_row() -> None:
    x = _randn(4, 64) * torch.tensor([[1e-3], [1.0], [50.0], [0.0]])
    xq, scale = quantize_rows_fp8(x)
    assert xq.dtype == torch.float8_e4m3fn and scale.shape == (4, 1)
    assert xq.float().abs().amax(dim=1)[:3].tolist() == [FP8_MAX] * 3
    restored = xq.float() * scale
    rel = (restored - x).abs() / x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    assert rel.max() < 2**-4


def test_scaled_mm_equals_the_dequantized_reference() -> None:
    """The CPU build has `_scaled_mm` too: the GPU call, run here, matches the reference."""
    weight, scale = quantize_fp8(_randn(96, 128) * torch.logspace(-2, 1, 96).unsqueeze(1))
    x = (_randn(7, 128, seed=1) * 3).to(torch.bfloat16)
    bias = _randn(96, seed=2).to(torch.bfloat16)
    expected = fp8_linear_reference(x, weight, scale, bias)
    got = fp8_scaled_mm(x, weight, scale, bias)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, atol=0.0, rtol=2**-7)
    # And both stay close to the full-precision product.
    full = x.float() @ (weight.float() * scale.unsqueeze(1)).t() + bias.float()
    assert ((expected.float() - full).abs().max() / full.abs().max()) < 0.05


def test_scaled_mm_needs_hopper_and_aligned_shapes() -> None:
    assert not scaled_mm_supported(torch.device("cpu"))
    assert scaled_mm_shapes_ok(4096, 14336)
    assert not scaled_mm_shapes_ok(576, 1000)


def test_cpu_layers_keep_their_cpu_paths() -> None:
    """On CPU the layers compute exactly what they computed before the GPU paths existed."""
    weight = _randn(48, 128) * 0.1
    x = _randn(3, 128, seed=1)
    fp8 = Fp8Linear(128, 48, bias=False, dtype=torch.float32)
    fp8.weight, fp8.scale = quantize_fp8(weight)
    expected = F.linear(x, fp8.weight.float()) * fp8.scale
    torch.testing.assert_close(fp8(x), expected, atol=0.0, rtol=0.0)
    int4 = Int4Linear(128, 48, bias=False, group_size=32, dtype=torch.float32)
    int4.packed, int4.scales, int4.mins = quantize_int4(weight, 32)
    expected = F.linear(x, dequantize_int4(int4.packed, int4.scales, int4.mins, torch.float32))
    torch.testing.assert_close(int4(x), expected, atol=0.0, rtol=0.0)
