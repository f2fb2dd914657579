"""Prepacked bfloat16 linears (oneDNN) on CPUs with native bfloat16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backend.executor.packed_linear import PackedLinear, pack_linears, packing_applies
from backend.models.synthetic import build_synthetic_model, tiny_llama_config

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(
    not packing_applies(CPU, torch.bfloat16),
    reason="this CPU has no native bfloat16 (AVX512_BF16 or AMX): linears are not prepacked",
)


def test_packing_applies_only_to_bfloat16_on_cpu() -> None:
    assert packing_applies(CPU, torch.bfloat16)
    assert not packing_applies(CPU, torch.float32)
    assert not packing_applies(torch.device("cuda"), torch.bfloat16)


@pytest.mark.parametrize("rows", [1, 5, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_a_plain_linear(rows: int, bias: bool) -> None:
    torch.manual_seed(rows)
    linear = nn.Linear(96, 160, bias=bias).to(torch.bfloat16)
    if bias:
        nn.init.normal_(linear.bias)
    x = torch.randn(2, rows, 96).to(torch.bfloat16)
    expected = F.linear(
        x.float(), linear.weight.float(), None if bias is False else linear.bias.float()
    )
    got = PackedLinear(linear)(x)
    assert got.shape == (2, rows, 160) and got.dtype == torch.bfloat16
    # Only the accumulation order and the final rounding to bfloat16 differ.
    torch.testing.assert_close(got.float(), expected, rtol=1.6e-2, atol=1e-2)


def test_pack_linears_replaces_only_bfloat16_linears() -> None:
    model = nn.Sequential(
        nn.Linear(8, 8).to(torch.bfloat16), nn.Linear(8, 8), nn.Linear(8, 8).to(torch.bfloat16)
    )
    assert pack_linears(model) == 2
    assert [type(m) for m in model] == [PackedLinear, nn.Linear, PackedLinear]


def test_a_bfloat16_model_on_cpu_is_assembled_packed_and_agrees_with_float32() -> None:
    config = tiny_llama_config()
    packed = build_synthetic_model(config, torch.bfloat16, CPU)
    reference = build_synthetic_model(config, torch.float32, CPU)
    layers = [m for m in packed.modules() if isinstance(m, (nn.Linear, PackedLinear))]
    assert layers and all(isinstance(m, PackedLinear) for m in layers)
    assert not any(isinstance(m, PackedLinear) for m in reference.modules())
    x = torch.randn(3, config.hidden_size)
    for got_layer, ref_layer in [
        (packed.output, reference.output),
        (packed.layers[0].feed_forward.w13, reference.layers[0].feed_forward.w13),
    ]:
        got = got_layer(x.to(torch.bfloat16)).float()
        expected = ref_layer(x)
        torch.testing.assert_close(got, expected, rtol=3e-2, atol=3e-2)
