"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) over a paged KV cache.

One forward runs a flat batch of tokens from many requests. Every linear layer runs
once over the whole batch; attention reads each request's keys and values through its
block table: on CPU by gathering them into padded groups for SDPA (`groups`), on
CUDA by a kernel that walks the block tables itself (`paged`, see
`backend/executor/kernels/paged_attention.py`). Each layer's cache is a pair of tensors shaped
`[num_blocks, block_size, num_kv_heads, head_dim]`; token position `p` of a request
lives in block `block_table[p // block_size]` at slot `p % block_size`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backend.executor.kernels.paged_attention import PagedAttentionMetadata
from backend.executor.kernels.paged_attention import paged_attention as paged_attention_kernel

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
KVCache = tuple[Tensor, Tensor]
"""One layer's (key, value) cache, each `[num_blocks, block_size, num_kv_heads, head_dim]`."""
Rope = tuple[Tensor, Tensor]
"""(cos, sin) per token, `[T, 1, head_dim]`."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: `linear` (position interpolation) or `llama3`."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LlamaConfig:
    """The architecture knobs read from a Hugging Face `config.json`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    rope_scaling: RopeScaling | None = None

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any]) -> LlamaConfig:
        """Parse a `config.json` dict (transformers 4.x and 5.x spellings)."""
        model_type = raw.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}")
        rope = dict(raw.get("rope_parameters") or {})
        rope.update(raw.get("rope_scaling") or {})
        theta = float(raw.get("rope_theta", rope.get("rope_theta", 10000.0)))
        kind = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if kind in ("linear", "llama3"):
            known = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            extra = {
                key: type(getattr(RopeScaling, key))(rope[key]) for key in known if key in rope
            }
            scaling = RopeScaling(kind=kind, factor=float(rope["factor"]), **extra)
        elif kind != "default":
            raise ValueError(f"unsupported rope scaling {kind!r}")
        heads = int(raw["num_attention_heads"])
        max_pos = int(raw.get("max_position_embeddings", 4096))
        window = raw.get("sliding_window")
        uses_window = model_type == "mistral" or bool(raw.get("use_sliding_window"))
        if uses_window and window:
            # Attention here is over the full context, which equals sliding-window
            # attention only while the context fits in the window.
            max_pos = min(max_pos, int(window))
        attention_bias = bool(raw.get("attention_bias", False))
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or raw["hidden_size"] // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            rope_scaling=scaling,
        )

    @classmethod
    def from_file(cls, path: Path) -> LlamaConfig:
        """Read and parse a `config.json` file."""
        return cls.from_hf(json.loads(path.read_text(encoding="utf-8")))


@dataclass(frozen=True)
class AttentionGroup:
    """Sequences attended together in one padded SDPA call (decodes, or prefill chunks).

    `B` sequences, `Q` query slots each (padding included), `C` key slots each.
    """

    query_index: Tensor
    """[B * Q] flat token index of each query slot; padding repeats a real token."""
    block_tables: Tensor
    """[B, C // block_size] block ids; padding entries point at any block and are masked."""
    mask: Tensor
    """[B, Q, C] True where the query may attend to the key."""
    pad_index: Tensor
    """[N] positions in the padded `B * Q` layout that hold real tokens."""
    token_index: Tensor
    """[N] flat token index of each of those real tokens."""


@dataclass(frozen=True)
class BatchMetadata:
    """Everything attention and sampling need beyond the token ids."""

    positions: Tensor
    """[T] position of each token in its sequence."""
    slot_mapping: Tensor
    """[T] flat cache slot (`block * block_size + offset`) where each token's K/V goes."""
    groups: tuple[AttentionGroup, ...]
    logits_index: Tensor
    """[S] flat index of the tokens whose next-token logits are wanted."""
    paged: PagedAttentionMetadata | None = None
    """When set, attention runs the paged kernel over these sequences and `groups` is empty."""


def rope_inv_freq(config: LlamaConfig) -> Tensor:
    """Inverse RoPE frequencies, scaled as the checkpoint asks."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv.float()
    if scaling.kind == "linear":
        return (inv / scaling.factor).float()
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * inv / scaling.factor + smooth * inv
    scaled = torch.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled).float()


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 like the reference."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """Normalize the last dimension."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def paged_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, group: AttentionGroup, mask: Tensor
) -> Tensor:
    """Attend one group's queries over their cached keys; returns `[N, heads, head_dim]`.

    Query heads that share a KV head are folded into the query length so K/V are
    never repeated: `q` becomes `[B, kv_heads, groups * Q, head_dim]`.
    """
    batch, q_len, ctx = group.mask.shape
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    heads = q.shape[1]
    rep = heads // kv_heads
    qg = q.index_select(0, group.query_index).view(batch, q_len, kv_heads, rep, head_dim)
    qg = qg.permute(0, 2, 3, 1, 4).reshape(batch, kv_heads, rep * q_len, head_dim)
    # index_select copies whole contiguous blocks; advanced indexing with the 2-D
    # table goes element by element and costs 2-3x more on CPU.
    blocks = group.block_tables.view(-1)
    k = k_cache.index_select(0, blocks).view(batch, ctx, kv_heads, head_dim).transpose(1, 2)
    v = v_cache.index_select(0, blocks).view(batch, ctx, kv_heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
    out = out.view(batch, kv_heads, rep, q_len, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(batch * q_len, heads, head_dim).index_select(0, group.pad_index)


class Attention(nn.Module):
    """Grouped-query self-attention with fused QKV projection."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.sizes = [q_size, kv_size, kv_size]
        self.wqkv = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.qkv_bias)
        self.wo = nn.Linear(q_size, config.hidden_size, bias=config.o_bias)

    def forward(
        self, x: Tensor, rope: Rope, meta: BatchMetadata, masks: list[Tensor], cache: KVCache
    ) -> Tensor:
        """Project, rotate, write the new K/V into the cache, and attend."""
        tokens = x.shape[0]
        q, k, v = self.wqkv(x).split(self.sizes, dim=-1)
        cos, sin = rope
        q = _rotate(q.view(tokens, self.num_heads, self.head_dim), cos, sin)
        k = _rotate(k.view(tokens, self.num_kv_heads, self.head_dim), cos, sin)
        k_cache, v_cache = cache
        # The cache may hold a narrower type than the model computes in
        # (`--kv-cache-dtype`): attention then runs in the cache's type.
        kv_dtype = k_cache.dtype
        q, k, v = q.to(kv_dtype), k.to(kv_dtype), v.to(kv_dtype)
        flat_shape = (-1, self.num_kv_heads, self.head_dim)
        k_cache.view(flat_shape).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(flat_shape).index_copy_(0, meta.slot_mapping, v.reshape(k.shape))
        if meta.paged is not None:
            out = paged_attention_kernel(q, k_cache, v_cache, meta.paged, self.scale)
        else:
            out = torch.empty_like(q)
            for group, mask in zip(meta.groups, masks, strict=True):
                attended = paged_attention(q, k_cache, v_cache, group, mask)
                out.index_copy_(0, group.token_index, attended)
        projected: Tensor = self.wo(out.view(tokens, -1).to(x.dtype))
        return projected


class FeedForward(nn.Module):
    """SwiGLU MLP with the gate and up projections fused."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.w13 = nn.Linear(config.hidden_size, 2 * config.intermediate_size, config.mlp_bias)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, config.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        """Gate, up, down."""
        gate, up = self.w13(x).chunk(2, dim=-1)
        down: Tensor = self.w2(F.silu(gate) * up)
        return down


class Block(nn.Module):
    """One pre-norm transformer layer."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: Tensor, rope: Rope, meta: BatchMetadata, masks: list[Tensor], cache: KVCache
    ) -> Tensor:
        """Residual attention then residual MLP."""
        h: Tensor = x + self.attention(self.attention_norm(x), rope, meta, masks, cache)
        out: Tensor = h + self.feed_forward(self.ffn_norm(h))
        return out


class LlamaForCausalLM(nn.Module):
    """The decoder; stateless apart from the KV caches passed to `forward`."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope_cos: Tensor
        self.rope_sin: Tensor
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)

    def setup_rope(self, device: torch.device | str, max_positions: int | None = None) -> None:
        """Build the cos/sin tables (call after loading weights from the meta device)."""
        inv = rope_inv_freq(self.config).to(device)
        limit = self.config.max_position_embeddings
        positions = torch.arange(min(max_positions or limit, limit), device=device).float()
        freqs = torch.outer(positions, inv)
        angles = torch.cat((freqs, freqs), dim=-1)
        self.rope_cos, self.rope_sin = angles.cos(), angles.sin()

    def forward(self, input_ids: Tensor, meta: BatchMetadata, caches: list[KVCache]) -> Tensor:
        """Run the flat batch; return float32 logits `[S, vocab]` for `meta.logits_index`."""
        x = self.tok_embeddings(input_ids)
        cos = self.rope_cos[meta.positions].to(x.dtype).unsqueeze(1)
        sin = self.rope_sin[meta.positions].to(x.dtype).unsqueeze(1)
        rep = self.config.num_heads // self.config.num_kv_heads
        masks = []
        for group in meta.groups:
            batch, q_len, ctx = group.mask.shape
            expanded = group.mask.unsqueeze(1).expand(batch, rep, q_len, ctx)
            masks.append(expanded.reshape(batch, 1, rep * q_len, ctx))
        for layer, cache in zip(self.layers, caches, strict=True):
            x = layer(x, (cos, sin), meta, masks, cache)
        x = self.norm(x.index_select(0, meta.logits_index))
        logits: Tensor = self.output(x)
        return logits.float()
