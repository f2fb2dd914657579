"""Attention that reads each sequence's keys and values straight from the paged cache.

The flat batch holds, for each sequence, a contiguous run of query tokens (one for
a decode, a chunk for a prefill). Sequence `i`'s queries are tokens
`query_start[i] .. query_start[i + 1] - 1`; after this step it has `seq_lens[i]`
tokens in the cache, so its queries sit at positions `seq_lens[i] - q_len ..
seq_lens[i] - 1` and each attends causally to the keys at positions up to its own.
Key position `p` lives in block `block_tables[i, p // block_size]`, slot
`p % block_size`.

On CUDA with Triton, `paged_attention` runs the kernel in `paged_attention_triton`,
which reads only the blocks in use; everywhere else it runs
`paged_attention_reference`, a per-sequence loop in float32 that the kernel is
checked against (and that the model's padded SDPA path is checked against too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from backend.executor.kernels import triton_kernels_supported

DECODE_ROWS = 16
"""Query rows per kernel program for decodes: tensor-core tiles need at least 16."""
PREFILL_ROWS = 64
"""Query rows (tokens x heads sharing a KV head) per kernel program for prefill chunks."""


@dataclass(frozen=True)
class PagedAttentionMetadata:
    """Per-sequence layout of one step's flat batch, for kernels that walk block tables."""

    query_start: Tensor
    """[B + 1] int32 or int64: sequence `i`'s queries are tokens `query_start[i]` to
    `query_start[i + 1] - 1` of the flat batch."""
    seq_lens: Tensor
    """[B] int32 or int64: tokens of sequence `i` in the cache after this step, queries included."""
    block_tables: Tensor
    """[B, W] int32 or int64 block ids; entries past a sequence's last block are never read."""
    max_query_len: int
    """Longest query run of the step (1 for a decode-only step); sizes the kernel grid."""


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def attention_launch_config(max_query_len: int, queries_per_kv: int) -> tuple[int, int]:
    """(query tokens, rows) per kernel program.

    A program owns one KV head of one sequence and a tile of its query tokens;
    every query head that shares the KV head becomes a row, so K and V are read
    once for all of them. Rows are padded to a power of two of at least 16.
    """
    if max_query_len == 1:
        return 1, max(DECODE_ROWS, next_power_of_2(queries_per_kv))
    rows = max(PREFILL_ROWS, next_power_of_2(queries_per_kv))
    return max(1, rows // queries_per_kv), rows


def paged_attention_reference(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: PagedAttentionMetadata, scale: float
) -> Tensor:
    """Causal attention of `q` `[T, heads, head_dim]` over the paged cache, in float32.

    One sequence at a time: gather its keys and values through its block table,
    expand them to every query head, mask keys after each query's position.
    """
    _, heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    rep = heads // kv_heads
    out = torch.empty_like(q)
    starts = meta.query_start.tolist()
    lengths = meta.seq_lens.tolist()
    for i, seq_len in enumerate(lengths):
        q_begin, q_end = starts[i], starts[i + 1]
        if q_end == q_begin:
            continue
        blocks = meta.block_tables[i, : math.ceil(seq_len / block_size)].long()
        k = k_cache[blocks].reshape(-1, kv_heads, head_dim)[:seq_len].float()
        v = v_cache[blocks].reshape(-1, kv_heads, head_dim)[:seq_len].float()
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        queries = q[q_begin:q_end].float()
        scores = torch.einsum("qhd,khd->hqk", queries, k) * scale
        positions = torch.arange(seq_len - (q_end - q_begin), seq_len, device=q.device)
        keys = torch.arange(seq_len, device=q.device)
        allowed = keys.view(1, -1) <= positions.view(-1, 1)
        scores = scores.masked_fill(~allowed, -torch.inf)
        attended = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)
        out[q_begin:q_end] = attended.to(q.dtype)
    return out


def paged_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: PagedAttentionMetadata, scale: float
) -> Tensor:
    """Attention over the paged cache: the Triton kernel on CUDA, else the reference."""
    if q.is_cuda and triton_kernels_supported(q.device):
        from backend.executor.kernels.paged_attention_triton import paged_attention_triton

        return paged_attention_triton(q, k_cache, v_cache, meta, scale)
    return paged_attention_reference(q, k_cache, v_cache, meta, scale)
