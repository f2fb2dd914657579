"""Decode steps replayed as CUDA graphs, one graph per captured batch size.

A decode-only step (every chunk one token) of `n` sequences is padded up to the
smallest captured size `>= n`: the padding rows decode token 0 at position 0 of a
sequence of length 1 whose only block is a scratch block the scheduler never
hands out, so they write and read nothing that belongs to a request. The step's
token ids, positions, slots, sequence lengths and block tables are copied into
static device buffers and the graph of that size is replayed; it writes the
logits of every row into its own static output. Graphs share one memory pool and
are captured from the largest size down so smaller ones reuse its blocks.

Only the forward pass is captured: sampling reads per-request parameters and
runs eagerly after it. Steps with a prefill chunk, or more sequences than the
largest size, run eagerly. On CPU nothing here is used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from backend.executor.kernels.paged_attention import PagedAttentionMetadata
from backend.models.llama import BatchMetadata, KVCache, LlamaForCausalLM
from backend.scheduler.output import ScheduledChunk

DEFAULT_CAPTURE_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
WARMUP_RUNS = 2
"""Eager runs per size before capture: compiles Triton kernels and settles allocations."""


def capture_sizes(
    max_num_seqs: int, candidates: Sequence[int] = DEFAULT_CAPTURE_SIZES
) -> tuple[int, ...]:
    """The batch sizes to capture for a scheduler running at most `max_num_seqs`.

    Every candidate below `max_num_seqs`, then the first candidate that covers it
    (or `max_num_seqs` itself when no candidate is that large), so every decode
    step the scheduler can produce has a graph.
    """
    if max_num_seqs < 1:
        raise ValueError("max_num_seqs must be at least 1")
    ordered = sorted(set(candidates))
    sizes = [size for size in ordered if size < max_num_seqs]
    cover = next((size for size in ordered if size >= max_num_seqs), max_num_seqs)
    return (*sizes, cover)


def padded_batch_size(num_seqs: int, sizes: Sequence[int]) -> int | None:
    """The smallest captured size that holds `num_seqs` rows; None when none does."""
    return next((size for size in sizes if size >= num_seqs), None)


@dataclass(frozen=True)
class DecodeInputs:
    """One decode step padded to a captured size, as host arrays."""

    input_ids: np.ndarray
    """[size] token ids."""
    positions: np.ndarray
    """[size] position of each token."""
    slot_mapping: np.ndarray
    """[size] cache slot each token's K/V is written to."""
    seq_lens: np.ndarray
    """[size] sequence lengths including the new token."""
    block_tables: np.ndarray
    """[size, width] block ids; `width` covers the longest sequence of the step."""


def pad_decode_inputs(
    chunks: Sequence[ScheduledChunk], block_size: int, size: int, scratch_block: int
) -> DecodeInputs:
    """Lay out one-token chunks as `size` rows, the rows past the chunks as padding.

    Padding rows (and table entries past a sequence's last block) point at
    `scratch_block`, which no request owns.
    """
    if len(chunks) > size:
        raise ValueError(f"{len(chunks)} sequences do not fit a batch of {size}")
    positions = [chunk.start_pos for chunk in chunks]
    needed = [pos // block_size + 1 for pos in positions]
    width = max(needed, default=1)
    table: list[int] = []
    padding = [scratch_block] * width
    for chunk, num in zip(chunks, needed, strict=True):
        if num > len(chunk.block_ids):
            raise ValueError(f"request {chunk.request_id} has too few blocks for its tokens")
        table += chunk.block_ids[:num]
        table += padding[num:]
    num_pad = size - len(chunks)
    table += padding * num_pad
    scratch_slot = scratch_block * block_size
    slots = [
        chunk.block_ids[pos // block_size] * block_size + pos % block_size
        for chunk, pos in zip(chunks, positions, strict=True)
    ]
    return DecodeInputs(
        input_ids=np.array([c.token_ids[0] for c in chunks] + [0] * num_pad, dtype=np.int64),
        positions=np.array(positions + [0] * num_pad, dtype=np.int64),
        slot_mapping=np.array(slots + [scratch_slot] * num_pad, dtype=np.int64),
        seq_lens=np.array([pos + 1 for pos in positions] + [1] * num_pad, dtype=np.int64),
        block_tables=np.array(table, dtype=np.int64).reshape(size, width),
    )


class DecodeGraphs:
    """Static buffers and one captured forward per batch size, for one model and cache."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[KVCache],
        sizes: Sequence[int],
        block_size: int,
        max_model_len: int,
        scratch_block: int,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = tuple(sorted(sizes))
        self.block_size = block_size
        self.scratch_block = scratch_block
        device = kv_caches[0][0].device
        largest = self.sizes[-1]
        width = math.ceil(max_model_len / block_size)
        scratch_slot = scratch_block * block_size
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((largest,), scratch_slot, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(largest, dtype=torch.long, device=device)
        self.query_start = torch.arange(largest + 1, dtype=torch.long, device=device)
        self.logits_index = torch.arange(largest, dtype=torch.long, device=device)
        self.block_tables = torch.full(
            (largest, width), scratch_block, dtype=torch.long, device=device
        )
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}

    def metadata(self, size: int) -> BatchMetadata:
        """Views of the static buffers for a batch of `size` rows."""
        paged = PagedAttentionMetadata(
            query_start=self.query_start[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            max_query_len=1,
        )
        return BatchMetadata(
            positions=self.positions[:size],
            slot_mapping=self.slot_mapping[:size],
            groups=(),
            logits_index=self.logits_index[:size],
            paged=paged,
        )

    def capture(self) -> None:
        """Warm up and capture every size, largest first, into one memory pool."""
        pool = None
        with torch.inference_mode():
            for size in reversed(self.sizes):
                meta = self.metadata(size)
                ids = self.input_ids[:size]
                # Warm-up runs on a side stream, as graph capture requires.
                side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(WARMUP_RUNS):
                        self.model(ids, meta, self.kv_caches)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self.model(ids, meta, self.kv_caches)
                pool = graph.pool()
                self.graphs[size] = (graph, logits)
        torch.cuda.synchronize()

    def run(self, chunks: Sequence[ScheduledChunk]) -> Tensor | None:
        """Logits `[len(chunks), vocab]` of a decode-only step; None when no graph fits.

        The result is a view of the graph's static output: read it before the
        next replay.
        """
        size = padded_batch_size(len(chunks), self.sizes)
        if size is None or size not in self.graphs:
            return None
        self.stage(chunks, size)
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[: len(chunks)]

    def stage(self, chunks: Sequence[ScheduledChunk], size: int) -> None:
        """Copy a decode step, padded to `size` rows, into the static buffers."""
        inputs = pad_decode_inputs(chunks, self.block_size, size, self.scratch_block)
        width = inputs.block_tables.shape[1]
        for static, host in (
            (self.input_ids[:size], inputs.input_ids),
            (self.positions[:size], inputs.positions),
            (self.slot_mapping[:size], inputs.slot_mapping),
            (self.seq_lens[:size], inputs.seq_lens),
            (self.block_tables[:size, :width], inputs.block_tables),
        ):
            static.copy_(torch.from_numpy(host), non_blocking=True)
