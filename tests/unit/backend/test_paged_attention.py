"""The paged-attention reference against the model's SDPA path, on CPU.

The reference is what the Triton kernel is checked against on a GPU (and under
Triton's interpreter in test_kernel_interpreter.py); here it must agree with the
padded SDPA groups the CPU path runs, both alone and inside the whole model.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

torch = pytest.importorskip("torch")

from backend.engine.request import SamplingParams  # noqa: E402
from backend.executor.kernels.paged_attention import (  # noqa: E402
    attention_launch_config,
    paged_attention,
    paged_attention_reference,
)
from backend.executor.kernels.selfcheck import random_paged_case  # noqa: E402
from backend.executor.model_runner import prepare_batch  # noqa: E402
from backend.models.llama import paged_attention as sdpa_group_attention  # noqa: E402
from backend.models.synthetic import build_synthetic_model, tiny_llama_config  # noqa: E402
from backend.scheduler.output import ScheduledChunk  # noqa: E402

CPU = torch.device("cpu")
BLOCK_SIZE = 4
GREEDY = SamplingParams(temperature=0.0)


def _chunks(query_lens, context_lens, seed=0):
    """Chunks with ragged, shuffled block tables (plus spare blocks at the end)."""
    rng = random.Random(seed)
    needed = [-(-(c + q) // BLOCK_SIZE) for q, c in zip(query_lens, context_lens, strict=True)]
    blocks = list(range(sum(needed) + 4))
    rng.shuffle(blocks)
    chunks, taken = [], 0
    for i, (q, c, n) in enumerate(zip(query_lens, context_lens, needed, strict=True)):
        tokens = [rng.randrange(500) for _ in range(q)]
        # Tables may hold more blocks than the step needs (allocated ahead).
        table = [*blocks[taken : taken + n], blocks[-1 - i]]
        chunks.append(ScheduledChunk(f"r{i}", tokens, c, table, True, GREEDY, 0))
        taken += n
    return chunks, len(blocks)


def _group_attention(q, k_cache, v_cache, meta, heads, kv_heads):
    """The model's CPU attention: padded SDPA groups, masks expanded as in forward."""
    rep = heads // kv_heads
    out = torch.empty_like(q)
    for group in meta.groups:
        batch, q_len, ctx = group.mask.shape
        mask = group.mask.unsqueeze(1).expand(batch, rep, q_len, ctx)
        attended = sdpa_group_attention(
            q, k_cache, v_cache, group, mask.reshape(batch, 1, rep * q_len, ctx)
        )
        out.index_copy_(0, group.token_index, attended)
    return out


CASES = {
    "decodes": ([1, 1, 1, 1], [0, 3, 4, 29]),
    "prefills": ([9, 4, 13], [0, 5, 2]),
    "mixed": ([1, 11, 1, 6, 1], [17, 0, 4, 9, 0]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (6, 6), (9, 3)])
def test_reference_matches_the_sdpa_groups(case: str, heads: int, kv_heads: int) -> None:
    query_lens, context_lens = CASES[case]
    chunks, num_blocks = _chunks(query_lens, context_lens)
    head_dim = 16
    generator = torch.Generator().manual_seed(3)
    shape = (num_blocks, BLOCK_SIZE, kv_heads, head_dim)
    k_cache, v_cache = (
        torch.randn(shape, generator=generator),
        torch.randn(shape, generator=generator),
    )
    q = torch.randn(sum(query_lens), heads, head_dim, generator=generator)
    _, grouped = prepare_batch(chunks, BLOCK_SIZE, CPU)
    _, paged = prepare_batch(chunks, BLOCK_SIZE, CPU, paged=True)
    assert paged.groups == () and paged.paged is not None
    expected = _group_attention(q, k_cache, v_cache, grouped, heads, kv_heads)
    got = paged_attention_reference(q, k_cache, v_cache, paged.paged, head_dim**-0.5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # On CPU the dispatcher is the reference.
    torch.testing.assert_close(
        paged_attention(q, k_cache, v_cache, paged.paged, head_dim**-0.5), got
    )


def test_paged_metadata_layout() -> None:
    chunks, _ = _chunks([1, 6], [8, 0])
    _, meta = prepare_batch(chunks, BLOCK_SIZE, CPU, paged=True)
    assert meta.paged is not None
    assert meta.paged.query_start.tolist() == [0, 1, 7]
    assert meta.paged.seq_lens.tolist() == [9, 6]
    assert meta.paged.max_query_len == 6
    tables = meta.paged.block_tables.tolist()
    assert tables[0] == chunks[0].block_ids[:3]
    assert tables[1] == [*chunks[1].block_ids[:2], 0]
    assert meta.positions.tolist() == [8, 0, 1, 2, 3, 4, 5]


def test_random_cases_are_ragged_and_agree_in_low_precision() -> None:
    q, k_cache, v_cache, meta = random_paged_case(
        [1, 7, 1], [30, 0, 5], 8, 2, 16, 16, torch.bfloat16, seed=4
    )
    assert meta.block_tables.shape == (3, 2)
    expected = paged_attention_reference(q.float(), k_cache.float(), v_cache.float(), meta, 0.25)
    got = paged_attention_reference(q, k_cache, v_cache, meta, 0.25)
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)


def test_whole_model_agrees_on_both_attention_paths() -> None:
    """Prefill in chunks, then decodes, with the paged path and the SDPA path."""
    config = tiny_llama_config()
    model = build_synthetic_model(config, torch.float32, CPU, max_positions=256)
    shape = (24, BLOCK_SIZE, config.num_kv_heads, config.head_dim)
    caches = {
        path: [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_layers)]
        for path in ("sdpa", "paged")
    }
    rng = random.Random(5)
    a = [rng.randrange(config.vocab_size) for _ in range(23)]
    b = [rng.randrange(config.vocab_size) for _ in range(9)]
    a_blocks, b_blocks = [5, 17, 2, 9, 11, 0, 21, 3], [14, 7, 19, 1]
    steps = [
        [("a", a[:10], 0)],
        [("a", a[10:20], 10), ("b", b[:8], 0)],
        [("b", b[8:9], 8), ("a", a[20:21], 20)],
        [("a", a[21:22], 21), ("b", [3], 9)],
        [("b", [4], 10), ("a", a[22:23], 22)],
    ]
    tables = {"a": a_blocks, "b": b_blocks}
    for step in steps:
        chunks = [ScheduledChunk(r, t, s, tables[r], True, GREEDY, 0) for r, t, s in step]
        logits = {}
        for path, cache in caches.items():
            ids, meta = prepare_batch(chunks, BLOCK_SIZE, CPU, paged=path == "paged")
            meta = dataclasses.replace(meta, logits_index=torch.arange(len(ids)))
            with torch.inference_mode():
                logits[path] = model(ids, meta, cache)
        torch.testing.assert_close(logits["paged"], logits["sdpa"], atol=1e-5, rtol=1e-5)


def test_launch_config_folds_query_heads_into_rows() -> None:
    assert attention_launch_config(1, 4) == (1, 16)
    assert attention_launch_config(1, 32) == (1, 32)
    assert attention_launch_config(512, 4) == (16, 64)
    assert attention_launch_config(512, 3) == (21, 64)
    assert attention_launch_config(7, 128) == (1, 128)
    for max_query_len in (1, 2, 100):
        for rep in (1, 3, 4, 7, 8):
            block_q, rows = attention_launch_config(max_query_len, rep)
            assert rows >= 16 and rows & (rows - 1) == 0 and block_q * rep <= rows
