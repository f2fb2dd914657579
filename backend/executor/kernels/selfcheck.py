"""Each Triton kernel against its pure-torch reference, on seeded random inputs.

    python -m backend.executor.kernels.selfcheck              # on the CUDA device
    python -m backend.executor.kernels.selfcheck --interpret  # Triton's interpreter, on CPU

Attention runs ragged batches (decodes at several context lengths, prefill chunks
that start mid-sequence, block tables in shuffled order); the int4 matmul runs
decode- and small-prefill-sized inputs; the FP8 product runs where `_scaled_mm`
can (Hopper, or the CPU build's own `_scaled_mm` under `--interpret`). Each check
reports the largest error relative to the reference's largest magnitude.

Triton's interpreter runs the kernels in NumPy on CPU tensors, which checks their
indexing and masking without a GPU; it cannot run bf16 matmuls, so there the
kernels run in float32 and float16.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from backend.executor.kernels.fp8_matmul import (
    fp8_linear_reference,
    fp8_scaled_mm,
    scaled_mm_supported,
)
from backend.executor.kernels.int4_matmul import int4_matmul_reference
from backend.executor.kernels.paged_attention import (
    PagedAttentionMetadata,
    paged_attention_reference,
)

TOLERANCES = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
"""Largest error allowed, relative to the reference's largest magnitude."""


@dataclass(frozen=True)
class KernelCheck:
    """One kernel run against its reference."""

    name: str
    relative_error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        """True when the kernel matched within tolerance (NaN never does)."""
        return self.relative_error <= self.tolerance


def relative_error(got: Tensor, expected: Tensor) -> float:
    """max |got - expected| / max |expected|, in float32."""
    diff = (got.float() - expected.float()).abs().max().item()
    scale = max(expected.float().abs().max().item(), 1e-6)
    return float(diff / scale)


def random_paged_case(
    query_lens: Sequence[int],
    context_lens: Sequence[int],
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor, PagedAttentionMetadata]:
    """Random queries and caches, and metadata with shuffled, ragged block tables.

    Sequence `i` has `context_lens[i]` tokens cached before its `query_lens[i]`
    queries. Spare blocks hold noise, so a kernel that reads past a sequence's
    end shows up as an error.
    """
    generator = torch.Generator().manual_seed(seed)
    needed = [
        math.ceil((c + q) / block_size) for c, q in zip(context_lens, query_lens, strict=True)
    ]
    num_blocks = sum(needed) + 3
    cache_shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=generator).to(dtype)
    v_cache = torch.randn(cache_shape, generator=generator).to(dtype)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=generator).to(dtype)
    order = list(range(num_blocks))
    random.Random(seed).shuffle(order)
    width = max(needed)
    tables: list[int] = []
    taken = 0
    for num in needed:
        tables += order[taken : taken + num] + [order[-1]] * (width - num)
        taken += num
    query_start = [0]
    for n in query_lens:
        query_start.append(query_start[-1] + n)
    seq_lens = [c + q for c, q in zip(context_lens, query_lens, strict=True)]
    meta = PagedAttentionMetadata(
        query_start=torch.tensor(query_start, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device).view(len(needed), -1),
        max_query_len=max(query_lens),
    )
    return q.to(device), k_cache.to(device), v_cache.to(device), meta


ATTENTION_CASES = {
    "decode": ([1, 1, 1, 1, 1], [0, 15, 16, 100, 333]),
    "prefill+decode": ([37, 1, 5, 64, 1], [0, 40, 17, 3, 7]),
}
"""(query lengths, cached context lengths) per batch."""


def check_paged_attention(
    device: torch.device, dtypes: Sequence[torch.dtype], shapes: Sequence[tuple[int, int, int]]
) -> list[KernelCheck]:
    """The paged-attention kernel on each case, dtype and (heads, kv heads, head dim)."""
    from backend.executor.kernels.paged_attention_triton import paged_attention_triton

    checks = []
    for dtype in dtypes:
        for heads, kv_heads, head_dim in shapes:
            for case, (query_lens, context_lens) in ATTENTION_CASES.items():
                q, k_cache, v_cache, meta = random_paged_case(
                    query_lens, context_lens, heads, kv_heads, head_dim, 16, dtype, device
                )
                scale = head_dim**-0.5
                expected = paged_attention_reference(q, k_cache, v_cache, meta, scale)
                got = paged_attention_triton(q, k_cache, v_cache, meta, scale)
                name = f"paged attention {case} {heads}/{kv_heads}x{head_dim} {_name(dtype)}"
                checks.append(KernelCheck(name, relative_error(got, expected), TOLERANCES[dtype]))
    return checks


def check_int4_matmul(
    device: torch.device, dtypes: Sequence[torch.dtype], shapes: Sequence[tuple[int, int, int, int]]
) -> list[KernelCheck]:
    """The int4 kernel on each (rows, out, in, group size) against dequantize + matmul."""
    from backend.executor.kernels.int4_matmul_triton import int4_matmul_triton
    from backend.executor.quant import quantize_int4

    generator = torch.Generator().manual_seed(1)
    checks = []
    for dtype in dtypes:
        for rows, out_features, in_features, group_size in shapes:
            weight = torch.randn(out_features, in_features, generator=generator) * 0.05
            x = torch.randn(rows, in_features, generator=generator).to(dtype).to(device)
            packed, scales, mins = (t.to(device) for t in quantize_int4(weight, group_size))
            expected = int4_matmul_reference(x, packed, scales, mins)
            got = int4_matmul_triton(x, packed, scales, mins, group_size)
            name = f"int4 matmul {rows}x{in_features}->{out_features} g{group_size} {_name(dtype)}"
            checks.append(KernelCheck(name, relative_error(got, expected), TOLERANCES[dtype]))
    return checks


def check_fp8_matmul(
    device: torch.device, shapes: Sequence[tuple[int, int, int]]
) -> list[KernelCheck]:
    """`_scaled_mm` on each (rows, out, in) against the dequantized float32 product."""
    from backend.executor.quant import quantize_fp8

    generator = torch.Generator().manual_seed(2)
    checks = []
    for rows, out_features, in_features in shapes:
        weight, scale = quantize_fp8(torch.randn(out_features, in_features, generator=generator))
        x = torch.randn(rows, in_features, generator=generator).to(torch.bfloat16)
        bias = torch.randn(out_features, generator=generator).to(torch.bfloat16)
        x, weight, scale, bias = x.to(device), weight.to(device), scale.to(device), bias.to(device)
        expected = fp8_linear_reference(x, weight, scale, bias)
        got = fp8_scaled_mm(x, weight, scale, bias)
        name = f"fp8 scaled_mm {rows}x{in_features}->{out_features}"
        checks.append(KernelCheck(name, relative_error(got, expected), TOLERANCES[torch.bfloat16]))
    return checks


def check_kernels(device: torch.device, quick: bool = False) -> list[KernelCheck]:
    """Every kernel on `device` (CUDA, or CPU under Triton's interpreter)."""
    interpreted = device.type == "cpu"
    if interpreted:
        dtypes = [torch.float32, torch.float16]
        attention_shapes = [(4, 2, 16), (9, 3, 64)]
        int4_shapes = [(1, 48, 128, 32), (5, 100, 576, 64), (40, 64, 256, 32)]
        fp8_shapes = [(7, 96, 128)]
    else:
        dtypes = (
            [torch.bfloat16, torch.float32]
            if quick
            else [torch.bfloat16, torch.float16, torch.float32]
        )
        attention_shapes = [(32, 8, 128), (9, 3, 64)]
        if not quick:
            attention_shapes.append((14, 2, 64))
        int4_shapes = [(1, 4096, 4096, 32), (16, 6144, 4096, 32), (48, 4096, 14336, 32)]
        int4_shapes.append((3, 1536, 576, 64))
        fp8_shapes = [(1, 6144, 4096), (256, 28672, 4096), (5, 4096, 14336)]
    checks = check_paged_attention(device, dtypes, attention_shapes)
    checks += check_int4_matmul(device, dtypes, int4_shapes)
    if interpreted or scaled_mm_supported(device):
        checks += check_fp8_matmul(device, fp8_shapes)
    return checks


def enable_interpreter() -> None:
    """Make `@triton.jit` kernels run in Triton's CPU interpreter.

    Call before any kernel module is imported. The interpreter keeps scalars as
    one-element arrays and calls `int()` on them as loop bounds, which NumPy 2.4
    refuses; the patch reads the element instead (interpreter only).
    """
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime import interpreter

    original: Callable[..., None] = interpreter._patch_lang_tensor

    def patched(tensor: object, scope: interpreter._LangPatchScope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the checks, print one line each; exit status 1 when any fails."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interpret", action="store_true", help="Triton's interpreter on CPU")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    args = parser.parse_args(argv)
    if args.interpret:
        enable_interpreter()
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("no CUDA device: run with --interpret to check the kernels on CPU", file=sys.stderr)
        return 2
    checks = check_kernels(device, quick=args.quick)
    for check in checks:
        status = "ok" if check.ok else "FAIL"
        print(f"{status:4} {check.name}: {check.relative_error:.2e} (<= {check.tolerance:.0e})")
    return 0 if all(check.ok for check in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
