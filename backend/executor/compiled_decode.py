"""Decode steps run through `torch.compile` on CPU (`--compile`).

An eager decode step of the bundled model runs about 600 small operators
between its linears, and on a CPU each costs microseconds of dispatch: at
batch 1 that overhead is a third of the step. Inductor fuses the norms,
RoPE, casts and residual adds into a few C++ loops, and its C++ wrapper
(`cpp_wrapper`) calls the whole graph without going back to Python between
kernels; the bundled model's batch-1 step went from about 25 to 18.5 ms on a
Xeon with AMX (docs/backend.md, "Compiled decode").

What runs compiled: decode-only steps whose sequences form one attention
group (see `model_runner.split_by_context`), which covers every decode batch
under eight sequences and larger ones of similar context. Prefills, mixed
steps and split groups run eagerly; at those sizes the linears dominate.

Two graphs are compiled at warm-up, before the backend reports ready: one
for a single sequence (torch specializes a dimension of size 1) and one for
any larger batch. Block tables are padded to at least two blocks for the
same reason. After warm-up the compiler's stance is "eager_on_recompile", so
a step that would need a new graph runs eagerly instead of stalling every
request for a compile. Graphs are cached on disk (under the Tollgate cache
directory, `inductor/`), so a restart reuses the generated code and only
traces the model again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Literal

import structlog
import torch
from torch import Tensor
from torch._dynamo.utils import counters

from backend.executor.quant import Int4Linear
from backend.models.llama import BatchMetadata, KVCache, LlamaForCausalLM
from backend.models.loader import cache_root

log = structlog.get_logger(__name__)

Stance = Literal["eager_on_recompile", "fail_on_recompile"]

MIN_CONTEXT_BLOCKS = 2
"""Block-table width a compiled step is padded to, so that no traced dimension
is 1 (which torch would specialize, forcing another graph at serve time)."""

INDUCTOR_OPTIONS: dict[str, str | int | bool | Callable[..., object]] = {"cpp_wrapper": True}
"""The C++ wrapper removes Python between kernels: about 2 ms of a 19.5 ms
batch-1 step with the default Python wrapper."""


def compile_supported(device: torch.device) -> bool:
    """Compiled decode is a CPU path; CUDA steps replay CUDA graphs instead."""
    return device.type == "cpu"


def max_kernel_rows(model: LlamaForCausalLM) -> int | None:
    """The fewest rows up to which a layer of `model` keeps one kernel, or None."""
    limits = [
        m.kernel_max_rows
        for m in model.modules()
        if isinstance(m, Int4Linear) and m.kernel_weight is not None
    ]
    return min(limits, default=None)


class CompiledDecode:
    """The model's forward compiled for decode-only, single-group steps."""

    def __init__(self, model: LlamaForCausalLM, caches: list[KVCache]) -> None:
        # Keep generated code with the converted models rather than in /tmp,
        # which a reboot may clear; an operator's own setting wins.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
        self._forward: Callable[..., Tensor] = torch.compile(
            model, dynamic=True, fullgraph=True, options=INDUCTOR_OPTIONS
        )
        # `dynamic=True` makes every dimension symbolic, the KV pool's too;
        # the compiler would then relate the step's context length to the
        # block size and fix the block-table width instead. The pool and the
        # RoPE tables never change shape.
        for tensor in (*(t for pair in caches for t in pair), model.rope_cos, model.rope_sin):
            torch._dynamo.mark_static(tensor)
        # So do the weights, including the kernel layouts quantized linears
        # keep as plain attributes. Left symbolic, a weight dimension equal to
        # a warm-up dimension by chance (int4 scale groups of the bundled
        # model's down projection: 48, a 3-block mask: 48) is tied to it, and
        # the graph's guards then fail at every other context length.
        for module in model.modules():
            for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                torch._dynamo.mark_static(tensor)
            for value in vars(module).values():
                if isinstance(value, Tensor):
                    torch._dynamo.mark_static(value)
        self.serving_stance: Stance = "eager_on_recompile"
        """The compiler's stance after warm-up (tests set "fail_on_recompile")."""
        self._warm = False
        self.compile_seconds = 0.0
        self.max_batch = max_kernel_rows(model)
        """Sequences a compiled step may hold (None: any). An int4 layer takes
        a different kernel above its row limit, so the graph traced at two rows
        holds only up to it; a larger batch goes straight to the eager model
        rather than through a failed guard check (about 1.5 ms)."""
        self.graphs = 0
        """Graphs compiled at warm-up."""
        self.steps = 0
        """Steps run through this object after warm-up (eagerly where no graph fits)."""

    def __call__(self, input_ids: Tensor, meta: BatchMetadata, caches: list[KVCache]) -> Tensor:
        """Run one step; before `finish_warmup` this may compile a graph."""
        if not self._warm:
            started = time.monotonic()
            graphs = counters["stats"]["unique_graphs"]
            # One compile process: on a small CPU a pool of workers only adds
            # memory, and it would outlive the compile.
            with torch._inductor.config.patch(compile_threads=1):
                out = self._forward(input_ids, meta, caches)
            self.compile_seconds += time.monotonic() - started
            self.graphs += counters["stats"]["unique_graphs"] - graphs
            return out
        self.steps += 1
        with torch.compiler.set_stance(self.serving_stance):
            return self._forward(input_ids, meta, caches)

    def finish_warmup(self) -> None:
        """From now on never compile: a step no graph fits runs eagerly."""
        self._warm = True
        log.info("decode_compiled", graphs=self.graphs, seconds=round(self.compile_seconds, 1))
