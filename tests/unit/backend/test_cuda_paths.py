"""The CUDA fast paths against their references; every test here needs a GPU.

Kernels against references (the self-check), the model's paged-kernel and
CUDA-graph steps against the CPU engine's logits, the quantized layers' GPU
paths, and sampling without a host sync.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from backend.config import CacheConfig, ModelConfig, SchedulerConfig  # noqa: E402
from backend.engine.request import SamplingParams  # noqa: E402
from backend.executor.kernels import triton_kernels_supported  # noqa: E402
from backend.executor.kernels.fp8_matmul import (  # noqa: E402
    fp8_linear_reference,
    scaled_mm_supported,
)
from backend.executor.kernels.int4_matmul import int4_matmul_reference  # noqa: E402
from backend.executor.model_runner import ModelRunner  # noqa: E402
from backend.executor.quant import Fp8Linear, Int4Linear, quantize_fp8, quantize_int4  # noqa: E402
from backend.executor.sampling import Sampler  # noqa: E402
from backend.models.synthetic import build_synthetic_model, tiny_llama_config  # noqa: E402
from backend.scheduler.output import ScheduledChunk  # noqa: E402

CUDA = torch.device("cuda")
# Conditions hold only with a GPU, so without one every test reports "needs a CUDA GPU".
needs_triton = pytest.mark.skipif(
    torch.cuda.is_available() and not triton_kernels_supported(CUDA),
    reason="needs triton and compute capability 8.0 (Ampere) or newer",
)
GREEDY = SamplingParams(temperature=0.0)


@needs_triton
def test_kernels_match_their_references() -> None:
    from backend.executor.kernels.selfcheck import check_kernels

    failed = [c for c in check_kernels(CUDA, quick=True) if not c.ok]
    assert not failed, failed


def _runner(device: str, cuda_graphs: bool = True) -> ModelRunner:
    # Drawn on CPU and moved, so both runners hold the same weights.
    model = build_synthetic_model(tiny_llama_config(), torch.float32, "cpu", max_positions=128)
    model = model.to(device)
    return ModelRunner(
        ModelConfig(device=device, cuda_graphs=cuda_graphs),
        CacheConfig(block_size=4, num_blocks=64),
        SchedulerConfig(max_num_seqs=8, max_model_len=128),
        model=model,
    )


def _steps() -> list[list[ScheduledChunk]]:
    """Two prompts prefilled in chunks, a third joining, then decodes of all three."""
    tables = {"a": list(range(0, 10)), "b": list(range(20, 30)), "c": list(range(40, 50))}
    a, b, c = list(range(3, 21)), list(range(50, 61)), list(range(90, 95))

    def chunk(r: str, tokens: list[int], start: int) -> ScheduledChunk:
        return ScheduledChunk(r, tokens, start, tables[r], True, GREEDY, 0)

    steps = [[chunk("a", a[:10], 0), chunk("b", b, 0)], [chunk("a", a[10:], 10), chunk("c", c, 0)]]
    for i in range(6):
        steps.append(
            [chunk("a", [i + 1], 18 + i), chunk("b", [i + 2], 11 + i), chunk("c", [i + 3], 5 + i)]
        )
    steps.append([chunk("b", [9], 17)])  # a batch of one after batches of three
    return steps


@needs_triton
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_cuda_steps_match_the_cpu_engine(cuda_graphs: bool) -> None:
    cpu, gpu = _runner("cpu"), _runner("cuda", cuda_graphs)
    assert gpu.paged_kernel and gpu.use_cuda_graphs == cuda_graphs
    gpu.warmup()
    assert (gpu.graphs is not None) == cuda_graphs
    for chunks in _steps():
        expected = cpu.compute_logits(chunks)
        got = gpu.compute_logits(chunks).cpu()
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4)


@needs_triton
def test_int4_layer_runs_the_kernel_for_decode_batches() -> None:
    weight = torch.randn(256, 512, device=CUDA) * 0.05
    layer = Int4Linear(512, 256, bias=True, group_size=32, dtype=torch.bfloat16).to(CUDA)
    layer.packed, layer.scales, layer.mins = quantize_int4(weight, 32)
    layer.bias = torch.nn.Parameter(torch.randn(256, device=CUDA, dtype=torch.bfloat16))
    for rows in (1, 7, 200):
        x = torch.randn(rows, 512, device=CUDA, dtype=torch.bfloat16)
        expected = int4_matmul_reference(x, layer.packed, layer.scales, layer.mins, layer.bias)
        torch.testing.assert_close(layer(x), expected, atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(
    torch.cuda.is_available() and not scaled_mm_supported(CUDA),
    reason="needs compute capability 9.0 (Hopper) or newer",
)
def test_fp8_layer_uses_scaled_mm_on_hopper() -> None:
    layer = Fp8Linear(512, 256, bias=False, dtype=torch.bfloat16).to(CUDA)
    layer.weight, layer.scale = quantize_fp8(torch.randn(256, 512, device=CUDA))
    x = torch.randn(3, 5, 512, device=CUDA, dtype=torch.bfloat16)
    expected = fp8_linear_reference(x.view(-1, 512), layer.weight, layer.scale).view(3, 5, 256)
    torch.testing.assert_close(layer(x), expected, atol=2e-2, rtol=2e-2)


def test_sampling_never_syncs_and_seeds_reproduce() -> None:
    logits = torch.randn(4, 1000, device=CUDA) * 3
    logits[3] = logits[1]
    seeded = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=11)
    params = [SamplingParams(temperature=0.0), seeded, SamplingParams(temperature=1.2), seeded]
    sampler = Sampler(CUDA)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = sampler(logits, params, [0, 3, 0, 3])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tokens_host = tokens.tolist()
    assert tokens_host[0] == logits[0].argmax().item()
    assert tokens_host[1] == tokens_host[3]
    alone = Sampler(CUDA)(logits[1:2], [seeded], [3]).item()
    assert alone == tokens_host[1]
