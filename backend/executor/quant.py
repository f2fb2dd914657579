"""Weight-only quantization in two steps: quantize a state dict, then swap the modules.

`int4`: group-wise asymmetric 4-bit. Each group of `group_size` input columns of a
weight row has a float scale and minimum; a weight is `q * scale + min` with
`q` in 0..15. Two values are packed per uint8 (even column in the low nibble, odd
column in the high nibble), so a `[out, in]` weight is stored as `[out, in // 2]`
uint8 plus `[out, in // group_size]` float32 scales and minimums (about 6 bits
per weight in all). Dequantization computes `q * scale + min` in float32 before
casting: in bfloat16 the two terms often nearly cancel, and rounding each of them
first ruins small weights. The portable matmul dequantizes the whole weight and calls
`F.linear`, which is correct on every device but costs a full dequantization per
call. On CPU in bfloat16, `prepare_cpu_int4_kernels` additionally lays the
weights out for torch's fused int4 CPU matmul (`_weight_int4pack_mm_for_cpu`, which
computes `(q - 8) * scale + zero`, hence `zero = min + 8 * scale`). Its cost grows
with the number of rows while dequantizing is a fixed cost, so it serves batches of
up to `CPU_INT4_KERNEL_MAX_ROWS` tokens (decode steps: about 15x faster per layer at
one row) and larger batches (prefill) dequantize. Its float32 variant is far slower
for many rows and is not used.

`fp8`: `float8_e4m3fn` weights with one float32 scale per output channel
(`amax / 448`). The matmul upcasts the weight to the compute dtype and applies the
scale to the output, which is equivalent because each scale belongs to one output.

The token embedding and `output` (lm_head, often tied to the embedding) stay in full
precision: they are lookups or a single projection whose error shows directly in
the logits, and the tied pair could not share one quantized tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QuantScheme = Literal["int4", "fp8"]
INT4_GROUP_SIZES = (32, 64)
FP8_MAX = 448.0
UNQUANTIZED_LINEARS = frozenset({"output"})
CPU_INT4_DTYPES = (torch.bfloat16,)
CPU_INT4_KERNEL_MAX_ROWS = 32
CPU_INNER_K_TILES = 2


def int4_group_size(in_features: int, preferred: int = 32) -> int | None:
    """The group size used for a layer with `in_features` inputs, or None if none fits."""
    for size in (preferred, *INT4_GROUP_SIZES):
        if in_features % size == 0:
            return size
    return None


def quantize_int4(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize `[out, in]` to (packed uint8 `[out, in//2]`, scales, mins `[out, in//g]`)."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    low = groups.amin(dim=-1)
    high = groups.amax(dim=-1)
    scale = ((high - low) / 15.0).clamp_min(1e-12)
    q = torch.round((groups - low.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, 15)
    q = q.to(torch.uint8).reshape(out_features, in_features)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed.contiguous(), scale, low


def dequantize_int4(packed: Tensor, scales: Tensor, mins: Tensor, dtype: torch.dtype) -> Tensor:
    """Inverse of `quantize_int4` in `dtype`; the group size follows from the shapes."""
    out_features = packed.shape[0]
    q = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(out_features, -1)
    num_groups = scales.shape[1]
    grouped = q.float().view(out_features, num_groups, -1)
    weight = grouped * scales.float().unsqueeze(-1) + mins.float().unsqueeze(-1)
    return weight.view(out_features, -1).to(dtype)


def quantize_fp8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Quantize `[out, in]` to (float8_e4m3fn weight, float32 per-output-channel scale)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_min(1e-12)
    return (w / scale.unsqueeze(1)).to(torch.float8_e4m3fn), scale


class Int4Linear(nn.Module):
    """`nn.Linear` replacement holding packed group-wise int4 weights."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        group_size: int,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        num_groups = in_features // group_size
        self.packed: Tensor
        self.scales: Tensor
        self.mins: Tensor
        self.register_buffer(
            "packed", torch.empty(out_features, in_features // 2, dtype=torch.uint8)
        )
        self.register_buffer("scales", torch.empty(out_features, num_groups))
        self.register_buffer("mins", torch.empty(out_features, num_groups))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None
        self.group_size = group_size
        self.compute_dtype = dtype
        self.kernel_weight: Tensor | None = None
        self.kernel_scales_and_zeros: Tensor | None = None

    def prepare_cpu_kernel(self) -> bool:
        """Lay the weight out for torch's fused CPU int4 matmul; False when unsupported."""
        if self.packed.device.type != "cpu" or self.compute_dtype not in CPU_INT4_DTYPES:
            return False
        try:
            q = torch.stack((self.packed & 0x0F, self.packed >> 4), dim=-1)
            q = q.reshape(self.out_features, self.in_features).to(torch.int32)
            weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, CPU_INNER_K_TILES)
            scales, zeros = self.scales.float(), self.mins.float() + 8 * self.scales.float()
            scales_and_zeros = torch.stack((scales.t(), zeros.t()), dim=-1)
            scales_and_zeros = scales_and_zeros.to(self.compute_dtype).contiguous()
        except (AttributeError, RuntimeError):
            return False
        self.kernel_weight, self.kernel_scales_and_zeros = weight, scales_and_zeros
        return True

    def forward(self, x: Tensor) -> Tensor:
        """Multiply by the int4 weight (fused kernel when prepared, else dequantize)."""
        flat = x.reshape(-1, self.in_features)
        if (
            self.kernel_weight is not None
            and self.kernel_scales_and_zeros is not None
            and flat.shape[0] <= CPU_INT4_KERNEL_MAX_ROWS
            and x.dtype == self.kernel_scales_and_zeros.dtype
        ):
            y: Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat, self.kernel_weight, self.group_size, self.kernel_scales_and_zeros
            )
            y = y.view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        weight = dequantize_int4(self.packed, self.scales, self.mins, x.dtype)
        return F.linear(x, weight, self.bias)


class Fp8Linear(nn.Module):
    """`nn.Linear` replacement holding float8_e4m3fn weights and per-channel scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight: Tensor
        self.scale: Tensor
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn)
        )
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        """Upcast the weight, multiply, scale each output channel."""
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias


def quantizable_linears(model: nn.Module) -> list[str]:
    """Names of the `nn.Linear` modules that quantization replaces."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name not in UNQUANTIZED_LINEARS
    ]


def quantize_state_dict(
    state: Mapping[str, Tensor],
    linear_names: Iterable[str],
    scheme: QuantScheme,
    dtype: torch.dtype,
) -> dict[str, Tensor]:
    """Step one: replace each listed linear's weight with its quantized tensors.

    Other floating tensors are cast to `dtype`. Layers whose input size fits no
    int4 group size keep their full-precision weight (and module).
    """
    out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    for name in linear_names:
        weight = state[f"{name}.weight"]
        if scheme == "int4":
            group_size = int4_group_size(weight.shape[1])
            if group_size is None:
                continue
            del out[f"{name}.weight"]
            packed, scales, mins = quantize_int4(weight, group_size)
            out[f"{name}.packed"] = packed
            out[f"{name}.scales"], out[f"{name}.mins"] = scales, mins
        else:
            del out[f"{name}.weight"]
            out[f"{name}.weight"], out[f"{name}.scale"] = quantize_fp8(weight)
    return out


def swap_linears(
    model: nn.Module, linear_names: Iterable[str], scheme: QuantScheme, dtype: torch.dtype
) -> None:
    """Step two: replace the listed `nn.Linear` modules by their quantized counterparts."""
    for name in linear_names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = parent.get_submodule(child)
        assert isinstance(linear, nn.Linear)
        has_bias = linear.bias is not None
        replacement: nn.Module
        if scheme == "int4":
            group_size = int4_group_size(linear.in_features)
            if group_size is None:
                continue
            replacement = Int4Linear(
                linear.in_features, linear.out_features, has_bias, group_size, dtype
            )
        else:
            replacement = Fp8Linear(linear.in_features, linear.out_features, has_bias, dtype)
        setattr(parent, child, replacement)


def prepare_cpu_int4_kernels(model: nn.Module) -> int:
    """Switch every CPU `Int4Linear` to the fused kernel where supported; returns how many."""
    return sum(
        1
        for module in model.modules()
        if isinstance(module, Int4Linear) and module.prepare_cpu_kernel()
    )
