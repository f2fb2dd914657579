"""Our model's weights under Hugging Face names: the inverse of `loader.convert_hf_state_dict`.

Used to run transformers' implementation on exactly the weights the engine runs
(a synthetic model has no checkpoint folder to load from). The fused QKV and
gate/up matrices are split into views, so the export costs no memory.
"""

from __future__ import annotations

from typing import Any, cast

from torch import Tensor, nn

from backend.models.llama import Block, LlamaConfig, LlamaForCausalLM


def hf_config_dict(config: LlamaConfig) -> dict[str, Any]:
    """A `transformers.LlamaConfig` keyword dict for `config` (Llama layout only)."""
    if config.qkv_bias != config.o_bias:
        raise ValueError("transformers' Llama has one attention_bias for q, k, v and o")
    raw: dict[str, Any] = {
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.qkv_bias,
        "mlp_bias": config.mlp_bias,
    }
    scaling = config.rope_scaling
    if scaling is not None:
        raw["rope_scaling"] = {
            "rope_type": scaling.kind,
            "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings,
        }
    return raw


def hf_state_dict(model: LlamaForCausalLM) -> dict[str, Tensor]:
    """The model's weights as views under transformers' Llama parameter names."""
    config = model.config
    out = {
        "model.embed_tokens.weight": model.tok_embeddings.weight,
        "model.norm.weight": model.norm.weight,
        "lm_head.weight": _linear(model.output).weight,
    }
    q_size = config.num_heads * config.head_dim
    kv_size = config.num_kv_heads * config.head_dim
    for i, module in enumerate(model.layers):
        layer = cast(Block, module)
        prefix = f"model.layers.{i}."
        wqkv, wo = _linear(layer.attention.wqkv), _linear(layer.attention.wo)
        w13, w2 = _linear(layer.feed_forward.w13), _linear(layer.feed_forward.w2)
        for kind in ("weight", "bias"):
            fused = getattr(wqkv, kind)
            if fused is not None:
                q, k, v = fused.split([q_size, kv_size, kv_size], dim=0)
                out[f"{prefix}self_attn.q_proj.{kind}"] = q
                out[f"{prefix}self_attn.k_proj.{kind}"] = k
                out[f"{prefix}self_attn.v_proj.{kind}"] = v
            gate_up = getattr(w13, kind)
            if gate_up is not None:
                gate, up = gate_up.chunk(2, dim=0)
                out[f"{prefix}mlp.gate_proj.{kind}"] = gate
                out[f"{prefix}mlp.up_proj.{kind}"] = up
            for name, module in (("self_attn.o_proj", wo), ("mlp.down_proj", w2)):
                tensor = getattr(module, kind)
                if tensor is not None:
                    out[f"{prefix}{name}.{kind}"] = tensor
        out[f"{prefix}input_layernorm.weight"] = layer.attention_norm.weight
        out[f"{prefix}post_attention_layernorm.weight"] = layer.ffn_norm.weight
    return out


def _linear(module: nn.Module) -> nn.Linear:
    if not isinstance(module, nn.Linear):
        raise ValueError("only an unquantized model can be exported to transformers")
    return module


def build_hf_model(model: LlamaForCausalLM) -> Any:
    """transformers' `LlamaForCausalLM` sharing `model`'s weights (imports transformers)."""
    import torch
    import transformers

    config = transformers.LlamaConfig(**hf_config_dict(model.config))
    with torch.device("meta"):
        hf: Any = transformers.LlamaForCausalLM(config)
    hf.load_state_dict(hf_state_dict(model), strict=True, assign=True)
    # Assigning replaces parameters only; the RoPE frequencies are a buffer built
    # at construction, so build that module again on the weights' device.
    rotary = hf.model.rotary_emb
    hf.model.rotary_emb = type(rotary)(config=config).to(model.tok_embeddings.weight.device)
    return hf.eval()
