"""Decode-graph bucketing and padding, checked on CPU.

Capture and replay need a GPU (test_cuda_paths.py); what a replay computes is the
model run on the static buffers, which runs on CPU too: padded to a captured
size, with the padding rows on the scratch block, the real rows' logits must
equal an unpadded eager step's, and no real block may be written by padding.
"""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from backend.engine.request import SamplingParams  # noqa: E402
from backend.executor.cuda_graphs import (  # noqa: E402
    DEFAULT_CAPTURE_SIZES,
    DecodeGraphs,
    capture_sizes,
    pad_decode_inputs,
    padded_batch_size,
)
from backend.executor.model_runner import prepare_batch  # noqa: E402
from backend.models.synthetic import build_synthetic_model, tiny_llama_config  # noqa: E402
from backend.scheduler.output import ScheduledChunk  # noqa: E402

CPU = torch.device("cpu")
BLOCK_SIZE = 4
GREEDY = SamplingParams(temperature=0.0)


def test_capture_sizes_cover_max_num_seqs() -> None:
    assert capture_sizes(256) == DEFAULT_CAPTURE_SIZES
    assert capture_sizes(32) == (1, 2, 4, 8, 16, 32)
    assert capture_sizes(100) == (1, 2, 4, 8, 16, 32, 64, 128)
    assert capture_sizes(1) == (1,)
    assert capture_sizes(300) == (*DEFAULT_CAPTURE_SIZES, 300)
    with pytest.raises(ValueError):
        capture_sizes(0)


def test_padded_batch_size_is_the_next_captured_size() -> None:
    sizes = capture_sizes(256)
    assert [padded_batch_size(n, sizes) for n in (1, 2, 3, 5, 17, 128, 129, 256)] == [
        1,
        2,
        4,
        8,
        32,
        128,
        256,
        256,
    ]
    assert padded_batch_size(257, sizes) is None


def _decode(request_id: str, token: int, pos: int, blocks: list[int]) -> ScheduledChunk:
    return ScheduledChunk(request_id, [token], pos, blocks, True, GREEDY, 1)


def test_pad_decode_inputs_layout() -> None:
    chunks = [_decode("a", 11, 5, [3, 7, 9]), _decode("b", 12, 0, [4])]
    inputs = pad_decode_inputs(chunks, BLOCK_SIZE, size=4, scratch_block=20)
    assert inputs.input_ids.tolist() == [11, 12, 0, 0]
    assert inputs.positions.tolist() == [5, 0, 0, 0]
    assert inputs.slot_mapping.tolist() == [7 * 4 + 1, 4 * 4, 80, 80]
    assert inputs.seq_lens.tolist() == [6, 1, 1, 1]
    assert inputs.block_tables.tolist() == [[3, 7], [4, 20], [20, 20], [20, 20]]
    with pytest.raises(ValueError, match="do not fit"):
        pad_decode_inputs(chunks, BLOCK_SIZE, size=1, scratch_block=20)
    with pytest.raises(ValueError, match="too few blocks"):
        pad_decode_inputs([_decode("c", 1, 8, [1, 2])], BLOCK_SIZE, size=1, scratch_block=20)


def test_a_padded_step_computes_what_the_eager_step_does() -> None:
    config = tiny_llama_config()
    model = build_synthetic_model(config, torch.float32, CPU, max_positions=128)
    num_blocks = 16
    shape = (num_blocks + 1, BLOCK_SIZE, config.num_kv_heads, config.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_layers)]
    rng = random.Random(0)
    tables = {"a": [6, 1, 12], "b": [3, 9], "c": [15]}
    lengths = {"a": 9, "b": 6, "c": 2}
    prompts = {r: [rng.randrange(config.vocab_size) for _ in range(n)] for r, n in lengths.items()}
    with torch.inference_mode():
        for r, prompt in prompts.items():
            ids, meta = prepare_batch(
                [ScheduledChunk(r, prompt, 0, tables[r], True, GREEDY, 0)], BLOCK_SIZE, CPU
            )
            model(ids, meta, caches)
    decodes = [_decode(r, 7 + i, len(prompts[r]), tables[r]) for i, r in enumerate(prompts)]
    snapshot = [(k.clone(), v.clone()) for k, v in caches]

    with torch.inference_mode():
        ids, meta = prepare_batch(decodes, BLOCK_SIZE, CPU)
        expected = model(ids, meta, caches)
        eager_caches = [(k.clone(), v.clone()) for k, v in caches]
        for (k, v), (k0, v0) in zip(caches, snapshot, strict=True):
            k.copy_(k0)
            v.copy_(v0)
        graphs = DecodeGraphs(
            model, caches, capture_sizes(8), BLOCK_SIZE, 128, scratch_block=num_blocks
        )
        size = padded_batch_size(len(decodes), graphs.sizes)
        assert size == 4
        graphs.stage(decodes, size)
        replayed = model(graphs.input_ids[:size], graphs.metadata(size), caches)
    torch.testing.assert_close(replayed[: len(decodes)], expected, atol=1e-5, rtol=1e-5)
    for (k, v), (ek, ev) in zip(caches, eager_caches, strict=True):
        # Every real block holds what the eager step wrote (up to the matmul's
        # rounding at another batch size); padding only wrote the scratch block.
        torch.testing.assert_close(k[:num_blocks], ek[:num_blocks], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v[:num_blocks], ev[:num_blocks], atol=1e-5, rtol=1e-5)
        assert k[num_blocks].abs().sum() > 0 and ek[num_blocks].abs().sum() == 0

    # A smaller step after a larger one: stale rows past it must not leak in.
    with torch.inference_mode():
        graphs.stage(decodes[:1], 1)
        one = model(graphs.input_ids[:1], graphs.metadata(1), caches)
        ids, meta = prepare_batch(decodes[:1], BLOCK_SIZE, CPU)
        again = model(ids, meta, caches)
    torch.testing.assert_close(one, again, atol=1e-5, rtol=1e-5)
