# Kernel signatures are read by Triton's compiler, which takes annotations as
# specialisation hints, so the @triton.jit functions stay unannotated.
# mypy: disable-error-code="untyped-decorator,no-untyped-def"
"""Triton kernel: causal attention over the paged KV cache, decodes and prefill chunks alike.

The grid is (sequence, KV head, query tile). A program loads its query tile, every
query head that shares its KV head folded into the rows, then walks the sequence's
block table `TILE_N` keys at a time, only up to the last key its queries may see,
with an online softmax in float32. Importing this module imports Triton: only
`paged_attention.paged_attention` (on CUDA) and the self-check do.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from backend.executor.kernels.paged_attention import (
    PagedAttentionMetadata,
    attention_launch_config,
    next_power_of_2,
)

LOG2_E = 1.4426950408889634
TILE_N = 64
"""Keys per loop iteration (may span several KV blocks)."""


@triton.jit
def _paged_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_ptr,
    scale_log2,
    stride_q_token,
    stride_q_head,
    stride_o_token,
    stride_o_head,
    stride_k_block,
    stride_k_slot,
    stride_k_head,
    stride_v_block,
    stride_v_slot,
    stride_v_head,
    stride_table,
    QUERIES_PER_KV: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    IEEE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_tile = tl.program_id(2)
    # Metadata may be int32 or int64; positions and counts fit int32 either way.
    q_start = tl.load(query_start_ptr + seq).to(tl.int32)
    q_len = tl.load(query_start_ptr + seq + 1).to(tl.int32) - q_start
    first_q = q_tile * BLOCK_Q
    if first_q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    context = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    q_index = first_q + rows // QUERIES_PER_KV
    head = kv_head * QUERIES_PER_KV + rows % QUERIES_PER_KV
    row_valid = (rows < BLOCK_Q * QUERIES_PER_KV) & (q_index < q_len)
    q_pos = context + q_index
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = dims < HEAD_DIM

    q_offsets = (q_start + q_index)[:, None] * stride_q_token + head[:, None] * stride_q_head
    q = tl.load(
        q_ptr + q_offsets + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    # Keys past the tile's last query are never visible to it: stop there.
    kv_len = context + tl.minimum(first_q + BLOCK_Q, q_len)
    keys = tl.arange(0, TILE_N)
    table = block_tables_ptr + seq * stride_table
    for tile in range(0, tl.cdiv(kv_len, TILE_N)):
        k_pos = tile * TILE_N + keys
        k_valid = k_pos < kv_len
        block = tl.load(table + k_pos // PAGE_SIZE, mask=k_valid, other=0).to(tl.int64)
        slot = k_pos % PAGE_SIZE
        load_mask = k_valid[:, None] & dim_valid[None, :]
        k_offsets = block[:, None] * stride_k_block + slot[:, None] * stride_k_slot
        k = tl.load(
            k_cache_ptr + k_offsets + kv_head * stride_k_head + dims[None, :],
            mask=load_mask,
            other=0.0,
        )
        v_offsets = block[:, None] * stride_v_block + slot[:, None] * stride_v_slot
        v = tl.load(
            v_cache_ptr + v_offsets + kv_head * stride_v_head + dims[None, :],
            mask=load_mask,
            other=0.0,
        )
        # A constexpr `if` compiles only the taken branch (no ternary in kernels).
        if IEEE:  # noqa: SIM108
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale_log2
        visible = k_valid[None, :] & (k_pos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        # Key 0 is visible to every row, so after the first tile m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    out = acc / l_i[:, None]
    o_offsets = (q_start + q_index)[:, None] * stride_o_token + head[:, None] * stride_o_head
    tl.store(
        out_ptr + o_offsets + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & dim_valid[None, :],
    )


def paged_attention_triton(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: PagedAttentionMetadata, scale: float
) -> Tensor:
    """Launch the kernel; same contract as `paged_attention.paged_attention_reference`."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    _, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    queries_per_kv = heads // kv_heads
    block_q, block_m = attention_launch_config(meta.max_query_len, queries_per_kv)
    out = torch.empty_like(q)
    num_seqs = meta.seq_lens.shape[0]
    grid = (num_seqs, kv_heads, math.ceil(meta.max_query_len / block_q))
    _paged_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start,
        scale * LOG2_E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        meta.block_tables.stride(0),
        QUERIES_PER_KV=queries_per_kv,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        TILE_N=TILE_N,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=max(16, next_power_of_2(head_dim)),
        PAGE_SIZE=block_size,
        IEEE=q.dtype == torch.float32,
    )
    return out
