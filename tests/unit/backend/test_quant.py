"""Weight-only int4 and fp8 quantization."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from backend.executor.quant import (  # noqa: E402
    Fp8Linear,
    Int4Linear,
    dequantize_int4,
    quantizable_linears,
    quantize_fp8,
    quantize_int4,
    quantize_state_dict,
    swap_linears,
)


def _weight(out_features: int = 48, in_features: int = 128):
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_round_trip_error_is_within_half_a_step(group_size: int) -> None:
    weight = _weight()
    packed, scales, mins = quantize_int4(weight, group_size)
    assert packed.dtype == torch.uint8 and packed.shape == (48, 64)
    assert scales.shape == mins.shape == (48, 128 // group_size)
    restored = dequantize_int4(packed, scales, mins, torch.float32)
    step = scales.repeat_interleave(group_size, dim=1)
    assert ((restored - weight).abs() <= step / 2 + 1e-6).all()


def test_int4_values_on_the_grid_are_exact() -> None:
    q = torch.randint(0, 16, (8, 64), generator=torch.Generator().manual_seed(1)).float()
    q[:, 0], q[:, 1] = 0, 15  # every group spans the full range
    q[:, 32], q[:, 33] = 0, 15
    weight = q * 0.125 - 1.0
    restored = dequantize_int4(*quantize_int4(weight, 32), torch.float32)
    torch.testing.assert_close(restored, weight)


def test_fp8_relative_error_per_channel() -> None:
    weight = _weight() * torch.logspace(-3, 1, 48).unsqueeze(1)
    w8, scale = quantize_fp8(weight)
    assert w8.dtype == torch.float8_e4m3fn and scale.shape == (48,)
    restored = w8.float() * scale.unsqueeze(1)
    # e4m3 keeps 3 mantissa bits: relative error at most 2**-4 for normal values.
    rel = (restored - weight).abs() / weight.abs().amax(dim=1, keepdim=True)
    assert rel.max() < 2**-4


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(128, 48, bias=True)
        self.odd = nn.Linear(40, 8)  # no int4 group size divides 40
        self.output = nn.Linear(48, 10, bias=False)


@pytest.mark.parametrize("scheme", ["int4", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_step_swap_matches_dequantized_linear(scheme: str, dtype) -> None:
    torch.manual_seed(0)
    model = _Tiny()
    names = quantizable_linears(model)
    assert names == ["proj", "odd"]
    state = quantize_state_dict(model.state_dict(), names, scheme, dtype)  # type: ignore[arg-type]
    with torch.device("meta"):
        quantized = _Tiny()
        swap_linears(quantized, names, scheme, dtype)  # type: ignore[arg-type]
    quantized.load_state_dict(state, assign=True)
    expected_type = Int4Linear if scheme == "int4" else Fp8Linear
    assert isinstance(quantized.proj, expected_type)
    assert isinstance(quantized.output, nn.Linear)
    assert isinstance(quantized.odd, nn.Linear if scheme == "int4" else Fp8Linear)
    x = torch.randn(5, 128)
    reference = model.proj(x)
    got = quantized.proj(x.to(dtype)).float()
    rel = (got - reference).norm() / reference.norm()
    assert rel < (0.15 if scheme == "int4" else 0.08)
    assert quantized.output.weight.dtype == dtype


def test_cpu_int4_kernel_matches_dequantized_matmul() -> None:
    from backend.executor.quant import prepare_cpu_int4_kernels

    weight = _weight(64, 128)
    layer = Int4Linear(128, 64, True, 32, torch.bfloat16)
    packed, scales, mins = quantize_int4(weight, 32)
    layer.load_state_dict(
        {
            "packed": packed,
            "scales": scales,
            "mins": mins,
            "bias": torch.randn(64).bfloat16(),
        }
    )
    x = torch.randn(2, 3, 128).bfloat16()
    portable = layer(x).float()
    if prepare_cpu_int4_kernels(layer) == 0:
        pytest.skip("this torch build has no CPU int4 kernel")
    fused = layer(x).float()
    assert fused.shape == (2, 3, 64)
    torch.testing.assert_close(fused, portable, atol=0.05 * portable.abs().max().item(), rtol=0)
