"""`nn.Linear` with its weight prepacked for oneDNN: bfloat16 on CPU.

A bfloat16 `F.linear` on CPU hands oneDNN a plain `[out, in]` weight, which
it reorders into its blocked (AMX/VNNI) layout on every call; at decode
batch sizes that reorder reads and writes the weight once more per call.
Reordering once at load time made the bundled model's linears 1.1-1.8x
faster at 1-32 rows on a Xeon with AMX (docs/backend.md, "Prepacked
bfloat16 linears"). Float32 and quantized linears are left alone: the first
goes to MKL's own GEMV, the others have their own kernels.

Under `torch.compile` (backend/executor/compiled_decode.py) the call goes
through the `tollgate::packed_linear` custom op: Inductor lowers oneDNN's
linear only for weights frozen into the graph as constants, and a graph with
frozen oneDNN weights cannot be cached on disk; as an opaque op the weight
stays an input and the compiled graph is cached.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def packing_applies(device: torch.device, dtype: torch.dtype) -> bool:
    """True where the model's plain linears should be prepacked: bfloat16 on a
    CPU whose oneDNN has native bfloat16 (AVX512_BF16 or AMX)."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


@torch.library.custom_op("tollgate::packed_linear", mutates_args=())
def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
    """`x @ weight.T + bias` for a 2-D `x` and a weight prepacked by oneDNN."""
    out: Tensor = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return out


@packed_linear.register_fake
def _packed_linear_shape(
    x: Tensor, packed: Tensor, bias: Tensor | None, out_features: int
) -> Tensor:
    return x.new_empty(x.shape[0], out_features)


def prepacked_linear(x: Tensor, packed: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
    """`x @ weight.T + bias` for a 2-D `x` and a `_reorder_linear_weight` weight;
    through the custom op while `torch.compile` traces, directly otherwise (where
    the custom op's dispatch would only add overhead)."""
    if torch.compiler.is_compiling():
        traced: Tensor = torch.ops.tollgate.packed_linear(x, packed, bias, out_features)
        return traced
    out: Tensor = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return out


class PackedLinear(nn.Module):
    """A bfloat16 linear whose weight is held only in oneDNN's layout."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.packed: Tensor
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, None))
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        """`x @ weight.T + bias` over the last dimension."""
        out = prepacked_linear(
            x.reshape(-1, self.in_features), self.packed, self.bias, self.out_features
        )
        return out.view(*x.shape[:-1], self.out_features)


def pack_linears(model: nn.Module) -> int:
    """Replace every plain bfloat16 `nn.Linear` of `model` by a `PackedLinear`
    (call only where `packing_applies`); returns how many were replaced."""
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and module.weight.dtype == torch.bfloat16
    ]
    for name, module in targets:
        model.set_submodule(name, PackedLinear(module))
    return len(targets)
