"""Llama models with random weights, built directly on the target device.

For benchmarks of the engine at sizes whose weights are not on the machine (and
may not be downloaded): the architecture is exact, the weights are seeded noise.
The parameter shapes come from the model built on the meta device, each tensor is
drawn on `device` itself (no host copy of 16 GB), and the state goes through
`loader.assemble_model`, the path real checkpoints take, so quantization and the
kernel set-up are the ones a served model gets.
"""

from __future__ import annotations

import torch
from torch import Tensor

from backend.config import WeightQuant
from backend.models.llama import LlamaConfig, LlamaForCausalLM, RopeScaling
from backend.models.loader import assemble_model

INIT_STD = 0.02
"""Standard deviation of the random weights (the usual Llama initialisation)."""


def llama_3_1_8b_config() -> LlamaConfig:
    """Meta-Llama-3.1-8B's architecture (its `config.json`)."""
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        rope_scaling=RopeScaling(
            kind="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    )


def tiny_llama_config() -> LlamaConfig:
    """A few-layer model with the 8B's shape ratios (GQA 4:1, llama3 RoPE), for tests."""
    return LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        num_heads=8,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        rope_scaling=RopeScaling(kind="llama3", factor=8.0, original_max_position_embeddings=64),
    )


def random_state_dict(
    config: LlamaConfig, dtype: torch.dtype, device: torch.device | str, seed: int = 0
) -> dict[str, Tensor]:
    """Seeded random weights under `LlamaForCausalLM`'s names, drawn on `device`.

    Norm weights are ones and biases zeros, as a fresh model has them; everything
    else is normal with `INIT_STD`.
    """
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    state: dict[str, Tensor] = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(shape, dtype=dtype, device=device)
        elif name.endswith(".bias"):
            state[name] = torch.zeros(shape, dtype=dtype, device=device)
        else:
            tensor = torch.empty(shape, dtype=dtype, device=device)
            state[name] = tensor.normal_(0.0, INIT_STD, generator=generator)
    if config.tie_word_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state


def build_synthetic_model(
    config: LlamaConfig,
    dtype: torch.dtype,
    device: torch.device | str,
    quant: WeightQuant = "none",
    max_positions: int | None = None,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A ready-to-run model with `random_state_dict` weights, quantized as asked."""
    state = random_state_dict(config, dtype, device, seed)
    return assemble_model(config, state, dtype, device, quant, max_positions)
