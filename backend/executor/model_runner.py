"""Runs scheduler steps on the model: owns the weights, the paged KV cache and sampling.

On CPU attention gathers each step's keys into padded SDPA groups. On CUDA (with
Triton, Ampere or newer) the step carries `PagedAttentionMetadata` instead and
attention runs the paged kernel; decode-only steps then replay CUDA graphs
(`cuda_graphs.py`) unless `ModelConfig.cuda_graphs` is off. Graphs need one extra
KV block, past the ones the scheduler hands out, for their padding rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import structlog
import torch
from torch import Tensor

from backend.config import CacheConfig, ModelConfig, SchedulerConfig, WeightQuant
from backend.engine.request import SamplingParams
from backend.executor.compiled_decode import (
    MIN_CONTEXT_BLOCKS,
    CompiledDecode,
    compile_supported,
)
from backend.executor.cuda_graphs import DecodeGraphs, capture_sizes
from backend.executor.kernels import triton_kernels_supported
from backend.executor.kernels.paged_attention import PagedAttentionMetadata
from backend.executor.sampling import Sampler
from backend.models.llama import (
    AttentionGroup,
    BatchMetadata,
    KVCache,
    LlamaConfig,
    LlamaForCausalLM,
)
from backend.models.loader import load_model, model_source, resolve_model_dir, resolve_quant
from backend.scheduler.output import ModelOutput, ScheduledChunk, SchedulerOutput
from backend.tokenizer import Tokenizer

log = structlog.get_logger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype for a configured name; "auto" picks by hardware.

    On a CPU without native bf16 instructions, bf16 matmuls are emulated and
    run several times slower than float32, so "auto" only picks bf16 where it
    is fast.
    """
    if name != "auto":
        return TORCH_DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


def zeroed_cache(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A zero-filled KV cache tensor.

    On CPU the memory comes from calloc (via numpy), whose large allocations are
    fresh zero pages mapped on first write: a big pool costs resident memory
    only as its blocks fill. `torch.zeros` would write, and so map, every page
    at start. The cache must be zeros, not `empty`: padding slots of an
    attention group read blocks that were never written, and garbage there
    (a NaN times a zero weight) would poison the output.
    """
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    import numpy as np

    raw = np.zeros(math.prod(shape) * dtype.itemsize, dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype).view(shape)


def _long(values: Sequence[int], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


def _attention_group(
    members: list[tuple[ScheduledChunk, int]],
    block_size: int,
    device: torch.device,
    min_blocks: int = 1,
) -> AttentionGroup:
    """Pad the member chunks to a common query length and context length (at
    least `min_blocks` blocks)."""
    q_len = max(len(chunk.token_ids) for chunk, _ in members)
    num_ctx_blocks = max(
        min_blocks,
        *(math.ceil((chunk.start_pos + len(chunk.token_ids)) / block_size) for chunk, _ in members),
    )
    query_index: list[int] = []
    pad_index: list[int] = []
    token_index: list[int] = []
    tables: list[list[int]] = []
    for row, (chunk, offset) in enumerate(members):
        n = len(chunk.token_ids)
        query_index.extend(offset + min(i, n - 1) for i in range(q_len))
        pad_index.extend(row * q_len + i for i in range(n))
        token_index.extend(offset + i for i in range(n))
        needed = math.ceil((chunk.start_pos + n) / block_size)
        if needed > len(chunk.block_ids):
            raise ValueError(f"request {chunk.request_id} has too few blocks for its tokens")
        tables.append(chunk.block_ids[:needed] + [0] * (num_ctx_blocks - needed))
    starts = _long([chunk.start_pos for chunk, _ in members], device).unsqueeze(1)
    lengths = _long([len(chunk.token_ids) for chunk, _ in members], device).unsqueeze(1)
    slots = torch.arange(q_len, device=device).unsqueeze(0)
    keys = torch.arange(num_ctx_blocks * block_size, device=device)
    causal = keys.view(1, 1, -1) <= (starts + slots).unsqueeze(-1)
    # Padding query slots attend to key 0 only, so no row of the softmax is empty.
    mask = torch.where((slots < lengths).unsqueeze(-1), causal, keys.view(1, 1, -1) == 0)
    return AttentionGroup(
        query_index=_long(query_index, device),
        block_tables=_long([b for table in tables for b in table], device).view(len(members), -1),
        mask=mask,
        pad_index=_long(pad_index, device),
        token_index=_long(token_index, device),
    )


def paged_metadata(
    chunks: Sequence[ScheduledChunk], block_size: int, device: torch.device
) -> PagedAttentionMetadata:
    """Query runs, sequence lengths and block tables of the step's chunks, in batch order."""
    query_start = [0]
    seq_lens: list[int] = []
    needed: list[int] = []
    for chunk in chunks:
        n = len(chunk.token_ids)
        query_start.append(query_start[-1] + n)
        seq_lens.append(chunk.start_pos + n)
        needed.append(math.ceil((chunk.start_pos + n) / block_size))
    width = max(needed, default=1)
    table: list[int] = []
    for chunk, num in zip(chunks, needed, strict=True):
        if num > len(chunk.block_ids):
            raise ValueError(f"request {chunk.request_id} has too few blocks for its tokens")
        table += chunk.block_ids[:num]
        table += [0] * (width - num)
    return PagedAttentionMetadata(
        query_start=_long(query_start, device),
        seq_lens=_long(seq_lens, device),
        block_tables=_long(table, device).view(len(chunks), width),
        max_query_len=max((len(chunk.token_ids) for chunk in chunks), default=1),
    )


SPLIT_BELOW = 0.5
"""A decode starts a new attention group when its context is under this
fraction of the longest in its group."""
MIN_GROUP = 4
"""Fewest decodes worth a group of their own: each group costs one more
gather and SDPA call per layer."""


def split_by_context(
    decodes: list[tuple[ScheduledChunk, int]],
) -> list[list[tuple[ScheduledChunk, int]]]:
    """Decodes in groups of similar context length, longest first.

    A group is padded to its longest context, so one group for a batch whose
    contexts run from 30 to 800 tokens would gather and attend over about
    twice the keys that exist; splitting where the length halves keeps the
    padding under half of each group.
    """
    if len(decodes) < 2 * MIN_GROUP:
        return [decodes]
    ordered = sorted(decodes, key=lambda member: member[0].start_pos, reverse=True)
    groups: list[list[tuple[ScheduledChunk, int]]] = [[]]
    longest = ordered[0][0].start_pos + 1
    for index, member in enumerate(ordered):
        context = member[0].start_pos + 1
        remaining = len(ordered) - index
        if (
            context < longest * SPLIT_BELOW
            and len(groups[-1]) >= MIN_GROUP
            and remaining >= MIN_GROUP
        ):
            groups.append([])
            longest = context
        groups[-1].append(member)
    return groups


def prepare_batch(
    chunks: Sequence[ScheduledChunk],
    block_size: int,
    device: torch.device,
    paged: bool = False,
    min_blocks: int = 1,
) -> tuple[Tensor, BatchMetadata]:
    """Flatten the step's chunks into token ids and attention metadata.

    With `paged`, attention gets per-sequence block tables for the paged kernel.
    Otherwise single-token chunks (decodes) and longer chunks (prefills) form
    separate SDPA groups so that decodes are not padded to a prefill's length;
    each group's block tables are at least `min_blocks` wide.
    """
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logits_index: list[int] = []
    decodes: list[tuple[ScheduledChunk, int]] = []
    prefills: list[tuple[ScheduledChunk, int]] = []
    for chunk in chunks:
        offset, n = len(input_ids), len(chunk.token_ids)
        input_ids.extend(chunk.token_ids)
        span = range(chunk.start_pos, chunk.start_pos + n)
        positions.extend(span)
        slots.extend(chunk.block_ids[p // block_size] * block_size + p % block_size for p in span)
        (decodes if n == 1 else prefills).append((chunk, offset))
        if chunk.sample:
            logits_index.append(offset + n - 1)
    if paged:
        groups: tuple[AttentionGroup, ...] = ()
        paged_meta: PagedAttentionMetadata | None = paged_metadata(chunks, block_size, device)
    else:
        members = [*split_by_context(decodes), prefills]
        groups = tuple(_attention_group(g, block_size, device, min_blocks) for g in members if g)
        paged_meta = None
    meta = BatchMetadata(
        positions=_long(positions, device),
        slot_mapping=_long(slots, device),
        groups=groups,
        logits_index=_long(logits_index, device),
        paged=paged_meta,
    )
    return _long(input_ids, device), meta


class ModelRunner:
    """Loads the model and KV cache, and executes one `SchedulerOutput` per call.

    `model` serves a model built in memory (random weights for benchmarks) instead
    of loading `model_config.path`; such a runner has no tokenizer, and its dtype
    and device are the model's.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        scheduler_config: SchedulerConfig,
        *,
        model: LlamaForCausalLM | None = None,
    ) -> None:
        if model_config.num_threads:
            torch.set_num_threads(model_config.num_threads)
        self.model_dir: Path | None = None
        self.quant: WeightQuant
        self._tokenizer: Tokenizer | None = None
        if model is None:
            self.device = torch.device(model_config.device)
            self.dtype = resolve_dtype(model_config.dtype, self.device)
            self.model_dir = resolve_model_dir(model_config.path)
            self._tokenizer = Tokenizer.from_dir(self.model_dir)
            config = LlamaConfig.from_file(self.model_dir / "config.json")
            self.max_model_len = min(scheduler_config.max_model_len, config.max_position_embeddings)
            self.quant = resolve_quant(
                model_config.quant,
                model_source(model_config.path),
                self.model_dir,
                self.device,
                self.dtype,
            )
            model = load_model(
                self.model_dir, self.dtype, self.device, self.quant, self.max_model_len
            )
        else:
            # A model built by the caller is already quantized as it will run.
            self.quant = "none" if model_config.quant == "auto" else model_config.quant
            config = model.config
            self.device = model.tok_embeddings.weight.device
            self.dtype = model.tok_embeddings.weight.dtype
            # The model's RoPE tables may have been built for fewer positions.
            self.max_model_len = min(
                scheduler_config.max_model_len,
                config.max_position_embeddings,
                model.rope_cos.shape[0],
            )
        self.model = model
        self.block_size = cache_config.block_size
        block_shape = (self.block_size, config.num_kv_heads, config.head_dim)
        self.kv_dtype = (
            self.dtype if cache_config.dtype == "auto" else TORCH_DTYPES[cache_config.dtype]
        )
        bytes_per_block = 2 * config.num_layers * math.prod(block_shape) * self.kv_dtype.itemsize
        self.num_blocks = cache_config.num_blocks or cache_config.cache_bytes // bytes_per_block
        if self.num_blocks < 1:
            raise ValueError("the KV cache is too small for a single block")
        self.paged_kernel = self.device.type == "cuda" and triton_kernels_supported(self.device)
        self.use_cuda_graphs = self.paged_kernel and model_config.cuda_graphs
        # Block `num_blocks` (the scheduler's blocks are 0..num_blocks-1) is the
        # graphs' scratch block for padding rows.
        num_physical = self.num_blocks + (1 if self.use_cuda_graphs else 0)
        cache_shape = (num_physical, *block_shape)
        self.kv_caches: list[KVCache] = [
            (
                zeroed_cache(cache_shape, self.kv_dtype, self.device),
                zeroed_cache(cache_shape, self.kv_dtype, self.device),
            )
            for _ in range(config.num_layers)
        ]
        self.graph_sizes = capture_sizes(scheduler_config.max_num_seqs)
        self.graphs: DecodeGraphs | None = None
        self.compiled: CompiledDecode | None = (
            CompiledDecode(model, self.kv_caches)
            if model_config.compile and compile_supported(self.device)
            else None
        )
        self.sampler = Sampler(self.device)

    @property
    def tokenizer(self) -> Tokenizer:
        """The served model's tokenizer (a runner over an in-memory model has none)."""
        if self._tokenizer is None:
            raise RuntimeError("this runner serves a model built in memory, without a tokenizer")
        return self._tokenizer

    def compute_logits(self, chunks: Sequence[ScheduledChunk]) -> Tensor:
        """Run the chunks; return float32 logits `[S, vocab]` for those with `sample=True`.

        A decode step replayed from a CUDA graph returns a view of the graph's
        output, valid until the next step.
        """
        with torch.inference_mode():
            if self.graphs is not None and all(len(c.token_ids) == 1 for c in chunks):
                logits = self.graphs.run(chunks)
                if logits is not None:
                    if all(c.sample for c in chunks):
                        return logits
                    rows = [i for i, c in enumerate(chunks) if c.sample]
                    return logits.index_select(0, _long(rows, self.device))
            compiled = self.compiled
            if compiled is not None and (
                any(len(c.token_ids) != 1 for c in chunks)
                or (compiled.max_batch is not None and len(chunks) > compiled.max_batch)
            ):
                compiled = None
            input_ids, meta = prepare_batch(
                chunks,
                self.block_size,
                self.device,
                paged=self.paged_kernel,
                min_blocks=MIN_CONTEXT_BLOCKS if compiled is not None else 1,
            )
            if compiled is not None and len(meta.groups) == 1:
                return compiled(input_ids, meta, self.kv_caches)
            out: Tensor = self.model(input_ids, meta, self.kv_caches)
            return out

    def execute(self, scheduler_output: SchedulerOutput) -> ModelOutput:
        """Run one step and sample a token for every chunk with `sample=True`."""
        for request_id in scheduler_output.preempted_ids:
            self.release(request_id)
        chunks = scheduler_output.chunks
        if not chunks:
            return ModelOutput()
        with torch.inference_mode():
            logits = self.compute_logits(chunks)
            sampled = [c for c in chunks if c.sample]
            if not sampled:
                return ModelOutput()
            tokens = self.sampler(
                logits, [c.sampling for c in sampled], [c.num_generated for c in sampled]
            ).tolist()
        return ModelOutput(sampled={c.request_id: t for c, t in zip(sampled, tokens, strict=True)})

    def release(self, request_id: str) -> None:
        """Forget a finished or preempted request.

        The runner keeps no per-request state: KV blocks belong to the scheduler and
        sampling seeds derive from each chunk, so there is nothing to drop.
        """

    def warmup(self) -> None:
        """Run a short prefill and a decode so the first real request is not slow."""
        n = min(2 * self.block_size, self.max_model_len - 1)
        blocks = list(range(min(self.num_blocks, math.ceil((n + 1) / self.block_size))))
        if len(blocks) * self.block_size < n + 1:
            # Too small a pool to warm up in: compiling at the first request
            # instead would stall it, so decode runs eagerly.
            self.compiled = None
            return
        params = SamplingParams(max_tokens=1, temperature=0.0)
        prefill = ScheduledChunk("warmup", [0] * n, 0, blocks, True, params, 0)
        decode = ScheduledChunk("warmup", [0], n, blocks, True, params, 1)
        self.execute(SchedulerOutput(chunks=[prefill]))
        if self.compiled is not None:
            other = ScheduledChunk("warmup-2", [0], n - 1, blocks, True, params, 1)
            self.compile_decode(decode, other)
        self.execute(SchedulerOutput(chunks=[decode]))
        if self.use_cuda_graphs and self.graphs is None:
            self.capture_cuda_graphs()

    def compile_decode(self, single: ScheduledChunk, other: ScheduledChunk) -> None:
        """Compile the decode graphs from two warm-up decodes: `single` alone (the
        batch-1 graph), then both together (the graph for larger batches).

        A model the compiler cannot handle, or a machine without a C++
        compiler, keeps serving eagerly; the error is logged.
        """
        compiled = self.compiled
        if compiled is None:
            return
        try:
            self.execute(SchedulerOutput(chunks=[single]))
            self.execute(SchedulerOutput(chunks=[single, other]))
        except Exception as exc:  # any compiler failure means "run eagerly"
            log.warning("decode_compile_failed", error=f"{type(exc).__name__}: {exc}"[:2000])
            self.compiled = None
            return
        compiled.finish_warmup()

    def capture_cuda_graphs(self) -> None:
        """Capture the decode graphs (CUDA only; once, after the first eager steps)."""
        graphs = DecodeGraphs(
            self.model,
            self.kv_caches,
            self.graph_sizes,
            self.block_size,
            self.max_model_len,
            scratch_block=self.num_blocks,
        )
        graphs.capture()
        self.graphs = graphs
