"""Quantized linear layers in two steps: quantize a state dict, then swap the modules.

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
one row) and larger batches (prefill) dequantize, except on CPUs with native
bfloat16, where batches above `CPU_INT4_KERNEL_MAX_ROWS_PREPACKED` rows multiply by a
dequantized copy prepacked for oneDNN at load time (the weight's bfloat16 bytes in
memory, once): over the bundled model's 210 layer matmuls on a Xeon with AMX the
kernel took 4.0 ms at 1 row, 12.1 at 8 and 22.4 at 16, the prepacked copy 13.8 to
14.4 ms at 1 to 16 rows. Its float32 variant is far slower
for many rows and is not used.

`fp8`: `float8_e4m3fn` weights with one float32 scale per output channel
(`amax / 448`). The matmul upcasts the weight to the compute dtype and applies the
scale to the output, which is equivalent because each scale belongs to one output.

On CUDA the two layers pick their GPU kernels by the input's device, and the CPU
paths below are untouched: `int4` runs the Triton kernel of
`kernels/int4_matmul_triton.py` for decode-sized batches (dequantize + cuBLAS above
`CUDA_INT4_KERNEL_MAX_ROWS`), and `fp8` in bfloat16 on Hopper or newer quantizes
the activations per token and multiplies e4m3 by e4m3 with `torch._scaled_mm`
(`kernels/fp8_matmul.py`).

With `int4` and `fp8` the token embedding and `output` (lm_head, often tied to the
embedding) stay in full precision: they are lookups or a single projection whose
error shows directly in the logits, and the tied pair could not share one quantized
tensor.

`int8` (CPU only): int8 weights with one float32 scale per output channel
(symmetric, `amax / 127`), multiplied by fbgemm's dynamic int8 GEMM. It calls
`torch.ops.quantized.linear_prepack` and `torch.ops.quantized.linear_dynamic`
directly: they are what the deprecated `torch.ao.nn.quantized.dynamic.Linear` ran,
without its warning about moving to torchao. Only prepacking still warns (it needs
a `qint8` tensor, and torch deprecates creating those), so `pack_int8_weight`
silences that one message. The op quantizes its input per call with one uint8
scale for the whole tensor, and with `reduce_range=True` (what the module passed)
to 7 bits, because AVX2 without VNNI adds pairs of u8 x s8 products in saturating
int16. Alone, that ruins the bundled SmolLM2: some inputs, the down projection's
above all, have channels a few hundred times their RMS, which leaves the other
channels a handful of levels (measured: top-1 agreement 0.57 with float32 and 2.6x
the perplexity). So each call, up to `CPU_INT8_KERNEL_MAX_ROWS` rows:
- takes the `INT8_OUTLIER_CHANNELS` input channels of largest magnitude in the batch
  out of the int8 product and multiplies them in float32 by their weight columns, as
  LLM.int8() does; the columns are gathered from a transposed copy of the int8
  weight, so they are contiguous rows;
- divides each row by its own maximum before the op and multiplies the row of
  results back (skipped for one row), so tokens of different magnitude in a prefill
  or a decode batch do not share one range: in effect one scale per token.
With both, int8 agrees with float32 about as well as fp8 does (top-1 about 0.9,
perplexity within about 3%; see test_model_reference). The split and the scaling
add about ten small ops per layer, which cost about as much as the op itself at one
row. Measured on a 2-core AVX2 EPYC with one thread in float32, the model's 121
matmuls took 0.7-0.8x float32's time at 1 row, 0.6x at 8 and 0.8x at 32 (a whole
decode step at context 256: 1.2x, 1.3x and 1.15x faster). The outlier channels and
the op's range are chosen over the whole batch, so a request's tokens can change
slightly with what else runs in the same step. With many rows (prefill) the int8
product is no faster than float32 here (4% slower at 256 and 512 rows over the
model's matmuls), so above `CPU_INT8_KERNEL_MAX_ROWS` the layer multiplies by the
dequantized weight instead (as fast as float32 at 512 rows, and more accurate).

`int8` quantizes `output` as well: it is the largest matrix (28M of the bundled
model's 135M weights, 113 MB per token in float32; at one row about 16 ms in float32
against 4 in int8), and quantizing it measured no worse than keeping it (top-1
0.912 vs 0.922 over 103 tokens, one token apart, and 0.894 vs 0.894 over 821;
perplexity ratios 0.99 and 1.031 vs 0.98 and 1.030). A tied embedding stays a
float32 lookup; `output` gets its own int8 copy. fbgemm takes
float32 activations, so in a bfloat16 or float16 model each int8 layer casts its
input to float32 and its output back: the cast touches only activations, and the
7-bit inputs bound the accuracy anyway. The int8 weight is held twice (fbgemm's
packed copy and the transposed one), about 2 bytes per weight against 4 in float32.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backend.executor.kernels.fp8_matmul import (
    fp8_scaled_mm,
    scaled_mm_shapes_ok,
    scaled_mm_supported,
)
from backend.executor.kernels.int4_matmul import int4_matmul
from backend.executor.packed_linear import packing_applies, prepacked_linear

QuantScheme = Literal["int4", "fp8", "int8"]
INT4_GROUP_SIZES = (32, 64)
FP8_MAX = 448.0
INT8_MAX = 127
INT8_OUTLIER_CHANNELS = 16
"""Input channels per call that `int8` multiplies in float32 instead of int8."""
CPU_INT8_KERNEL_MAX_ROWS = 256
"""Above this many rows (prefill), `int8` multiplies by the dequantized weight instead."""
INT8_ENGINES = ("x86", "fbgemm")
INT8_DEPRECATION_MESSAGE = r".*quantized tensor creation functions.*deprecated"
UNQUANTIZED_LINEARS = frozenset({"output"})
"""Linears that `int4` and `fp8` keep in full precision (`int8` quantizes them too)."""
CPU_INT4_DTYPES = (torch.bfloat16,)
CPU_INT4_KERNEL_MAX_ROWS = 32
"""Rows up to which the fused int4 kernel beats dequantizing the weight per call."""
CPU_INT4_KERNEL_MAX_ROWS_PREPACKED = 8
"""Rows up to which it beats the prepacked bfloat16 copy, where one is kept."""
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


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Quantize `[out, in]` to (int8 weight in -127..127, float32 per-output-channel scale)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / INT8_MAX).clamp_min(1e-12)
    q = torch.round(w / scale.unsqueeze(1)).clamp(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def int8_unavailable_reason(device: torch.device) -> str | None:
    """Why fbgemm's int8 GEMM cannot serve a model on `device`; None when it can."""
    if device.type != "cpu":
        return (
            f"--quant int8 runs on CPU only (fbgemm's int8 GEMM), not on {device.type}; "
            "use --quant fp8 or int4 on a GPU"
        )
    engine = torch.backends.quantized.engine
    if engine not in INT8_ENGINES or not hasattr(torch.ops.quantized, "linear_dynamic"):
        return (
            "--quant int8 needs torch's fbgemm int8 GEMM (x86 CPUs), which this torch does "
            f"not offer (quantized engine {engine!r})"
        )
    return None


def pack_int8_weight(weight: Tensor, scale: Tensor) -> torch.ScriptObject:
    """Prepack an int8 `[out, in]` weight and its per-channel scales for fbgemm.

    Prepacking takes a `qint8` tensor, and creating one prints torch's deprecation
    warning for quantized tensors; it is silenced here and nowhere else.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=INT8_DEPRECATION_MESSAGE, category=UserWarning)
        qweight = torch._make_per_channel_quantized_tensor(
            weight.contiguous(),
            scale.double(),
            torch.zeros(scale.shape[0], dtype=torch.long),
            0,
        )
    packed: torch.ScriptObject = torch.ops.quantized.linear_prepack(qweight, None)
    return packed


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
        self.prefill_weight: Tensor | None = None
        """The dequantized weight prepacked for oneDNN (bfloat16 CPUs only), for
        batches above `kernel_max_rows`."""
        self.kernel_max_rows = CPU_INT4_KERNEL_MAX_ROWS

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
        if packing_applies(self.packed.device, self.compute_dtype):
            # Prefill would otherwise dequantize the whole weight on every call;
            # a prepacked bfloat16 copy costs the weight's bf16 bytes once.
            dense = dequantize_int4(self.packed, self.scales, self.mins, self.compute_dtype)
            self.prefill_weight = torch.ops.mkldnn._reorder_linear_weight(dense, None)
            self.kernel_max_rows = CPU_INT4_KERNEL_MAX_ROWS_PREPACKED
        return True

    def forward(self, x: Tensor) -> Tensor:
        """Multiply by the int4 weight (fused kernel when prepared, else dequantize)."""
        if x.is_cuda:
            return int4_matmul(x, self.packed, self.scales, self.mins, self.group_size, self.bias)
        flat = x.reshape(-1, self.in_features)
        if (
            self.kernel_weight is not None
            and self.kernel_scales_and_zeros is not None
            and flat.shape[0] <= self.kernel_max_rows
            and x.dtype == self.kernel_scales_and_zeros.dtype
        ):
            y: Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat, self.kernel_weight, self.group_size, self.kernel_scales_and_zeros
            )
            y = y.view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        if self.prefill_weight is not None and x.dtype == self.compute_dtype:
            out = prepacked_linear(flat, self.prefill_weight, self.bias, self.out_features)
            return out.view(*x.shape[:-1], self.out_features)
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
        self.scaled_mm_shapes = scaled_mm_shapes_ok(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        """e4m3 x e4m3 on Hopper in bf16; elsewhere upcast the weight, multiply, scale."""
        if (
            x.is_cuda
            and x.dtype == torch.bfloat16
            and self.scaled_mm_shapes
            and scaled_mm_supported(x.device)
        ):
            flat = x.reshape(-1, self.in_features)
            out = fp8_scaled_mm(flat, self.weight, self.scale, self.bias)
            return out.view(*x.shape[:-1], self.out_features)
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int8Linear(nn.Module):
    """`nn.Linear` replacement holding int8 weights with per-output-channel scales.

    Until `prepare_cpu_kernel` runs, the weight is dequantized for `F.linear`; after,
    the product is fbgemm's int8 GEMM plus the outlier channels in float32.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight: Tensor
        self.scale: Tensor
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None
        self.num_outliers = min(INT8_OUTLIER_CHANNELS, in_features)
        self.packed: torch.ScriptObject | None = None
        self.weight_by_input: Tensor | None = None

    def prepare_cpu_kernel(self) -> None:
        """Prepack for fbgemm (ValueError where it cannot run); call after loading weights.

        The int8 weight is kept once more, transposed, so that the outlier channels
        picked per call are contiguous rows; the `weight` buffer becomes a view of it.
        """
        reason = int8_unavailable_reason(self.weight.device)
        if reason is not None:
            raise ValueError(reason)
        self.packed = pack_int8_weight(self.weight, self.scale)
        self.weight_by_input = self.weight.t().contiguous()
        self.weight = self.weight_by_input.t()

    def forward(self, x: Tensor) -> Tensor:
        """Multiply by the int8 weight (see the module docstring for the int8 path)."""
        flat = x.reshape(-1, self.in_features)
        if (
            self.packed is None
            or self.weight_by_input is None
            or flat.shape[0] > CPU_INT8_KERNEL_MAX_ROWS
        ):
            weight = self.weight.to(x.dtype) * self.scale.to(x.dtype).unsqueeze(1)
            return F.linear(x, weight, self.bias)
        y = self._int8_matmul(flat.float())
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def _int8_matmul(self, flat: Tensor) -> Tensor:
        """`flat @ weight.T` for float32 `[rows, in]`: fbgemm inliers, float32 outliers."""
        assert self.packed is not None and self.weight_by_input is not None
        rows = flat.shape[0]
        magnitude = flat.abs()
        column_max = magnitude.view(-1) if rows == 1 else magnitude.amax(dim=0)
        outlier_index = column_max.topk(self.num_outliers).indices
        outliers = flat.index_select(1, outlier_index)
        inliers = flat.index_fill(1, outlier_index, 0.0)
        y: Tensor
        if rows == 1:
            y = torch.ops.quantized.linear_dynamic(inliers, self.packed, reduce_range=True)
        else:
            magnitude.index_fill_(1, outlier_index, 0.0)
            row_max = magnitude.amax(dim=1, keepdim=True).clamp_min_(torch.finfo(flat.dtype).tiny)
            y = torch.ops.quantized.linear_dynamic(
                inliers.div_(row_max), self.packed, reduce_range=True
            ).mul_(row_max)
        outlier_weight = self.weight_by_input.index_select(0, outlier_index).float()
        return y.addcmul_(outliers @ outlier_weight, self.scale)


def quantizable_linears(model: nn.Module, scheme: QuantScheme | None = None) -> list[str]:
    """Names of the `nn.Linear` modules that quantization with `scheme` replaces."""
    skipped = frozenset[str]() if scheme == "int8" else UNQUANTIZED_LINEARS
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name not in skipped
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
        elif scheme == "int8":
            del out[f"{name}.weight"]
            out[f"{name}.weight"], out[f"{name}.scale"] = quantize_int8(weight)
        else:
            del out[f"{name}.weight"]
            out[f"{name}.weight"], out[f"{name}.scale"] = quantize_fp8(weight)
    return out


def swap_linears(
    model: nn.Module, linear_names: Iterable[str], scheme: QuantScheme, dtype: torch.dtype
) -> None:
    """Step two: replace the listed `nn.Linear` modules by their quantized counterparts."""
    for name in linear_names:
        linear = model.get_submodule(name)
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
        elif scheme == "int8":
            replacement = Int8Linear(linear.in_features, linear.out_features, has_bias, dtype)
        else:
            replacement = Fp8Linear(linear.in_features, linear.out_features, has_bias, dtype)
        model.set_submodule(name, replacement)


def prepare_cpu_int4_kernels(model: nn.Module) -> int:
    """Switch every CPU `Int4Linear` to the fused kernel where supported; returns how many."""
    return sum(
        1
        for module in model.modules()
        if isinstance(module, Int4Linear) and module.prepare_cpu_kernel()
    )


def prepare_cpu_int8_kernels(model: nn.Module) -> int:
    """Prepack every `Int8Linear` for fbgemm (ValueError off the CPU); returns how many."""
    layers = [module for module in model.modules() if isinstance(module, Int8Linear)]
    for layer in layers:
        layer.prepare_cpu_kernel()
    return len(layers)
