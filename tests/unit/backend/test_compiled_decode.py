"""Decode steps through torch.compile (`--compile`) on CPU, on a small synthetic model.

The compiled graphs must give the eager model's logits, cover every decode batch
shape the scheduler produces without compiling again, and leave every other step
to the eager model. The real bundled model's compiled tokens are checked against
the eager ones in tests/integration/backend/test_model_reference.py.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator

import pytest
import torch
from torch._dynamo.utils import counters

from backend.config import CacheConfig, ModelConfig, SchedulerConfig, WeightQuant
from backend.engine.request import SamplingParams
from backend.executor.compiled_decode import CompiledDecode
from backend.executor.model_runner import ModelRunner, resolve_dtype
from backend.models.llama import LlamaConfig
from backend.models.synthetic import build_synthetic_model, tiny_llama_config
from backend.scheduler.output import ScheduledChunk, SchedulerOutput

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="torch.compile on CPU needs a C++ compiler (g++ or c++ on PATH)",
)

BLOCK = 16
GREEDY = SamplingParams(max_tokens=1, temperature=0.0)
CPU = torch.device("cpu")


def _runner(
    compile_decode: bool, quant: WeightQuant = "none", config: LlamaConfig | None = None
) -> ModelRunner:
    # The dtype "auto" picks here: bfloat16 (prepacked linears) on CPUs with
    # native bfloat16, else float32.
    dtype = resolve_dtype("auto", CPU)
    model = build_synthetic_model(
        config or tiny_llama_config(), dtype, CPU, quant=quant, max_positions=512
    )
    return ModelRunner(
        ModelConfig(device="cpu", compile=compile_decode),
        CacheConfig(block_size=BLOCK, num_blocks=256),
        SchedulerConfig(max_model_len=512),
        model=model,
    )


@pytest.fixture(scope="module")
def runner() -> Iterator[ModelRunner]:
    """One runner whose decode graphs were compiled at warm-up."""
    built = _runner(compile_decode=True)
    built.warmup()
    yield built


def _blocks(row: int) -> list[int]:
    return list(range(32 * row, 32 * (row + 1)))


def _prefill(runner: ModelRunner, lengths: list[int]) -> None:
    """Fill rows 0..n-1 of the cache with prompts of the given lengths (eagerly)."""
    chunks = [
        ScheduledChunk(
            f"r{row}", [(row * 7 + i) % 97 + 1 for i in range(n)], 0, _blocks(row), True, GREEDY, 0
        )
        for row, n in enumerate(lengths)
    ]
    runner.execute(SchedulerOutput(chunks=chunks))


def _decodes(lengths: list[int], token: int = 5) -> list[ScheduledChunk]:
    return [
        ScheduledChunk(f"r{row}", [token], n, _blocks(row), True, GREEDY, 1)
        for row, n in enumerate(lengths)
    ]


def test_warmup_compiles_two_graphs(runner: ModelRunner) -> None:
    assert isinstance(runner.compiled, CompiledDecode)
    assert runner.compiled.graphs == 2


@pytest.mark.parametrize("lengths", [[9], [40], [3, 70, 130], [200, 180, 150, 20, 5]])
def test_compiled_logits_match_the_eager_model(runner: ModelRunner, lengths: list[int]) -> None:
    _assert_compiled_matches_eager(runner, lengths)


def test_int4_weights_compile_and_match_the_eager_model() -> None:
    # int4 is the bundled checkpoint's own format and the fastest set-up with --compile.
    int4 = _runner(compile_decode=True, quant="int4")
    int4.warmup()
    assert int4.compiled is not None and int4.compiled.graphs == 2
    # A random model's logits hold near-ties, and int4's eager and compiled
    # kernels round differently: the argmax must agree where its lead is
    # larger than that difference.
    _assert_compiled_matches_eager(int4, [1], exact_argmax=False)
    _assert_compiled_matches_eager(int4, [60, 7, 33], exact_argmax=False)


def _assert_compiled_matches_eager(
    runner: ModelRunner, lengths: list[int], exact_argmax: bool = True
) -> None:
    _prefill(runner, lengths)
    chunks = _decodes(lengths)
    compiled = runner.compiled
    assert compiled is not None
    before = compiled.steps
    with torch.inference_mode():
        got = runner.compute_logits(chunks).clone()
        runner.compiled = None
        try:
            expected = runner.compute_logits(chunks)
        finally:
            runner.compiled = compiled
    assert compiled.steps == before + 1
    assert got.shape == expected.shape == (len(lengths), runner.model.config.vocab_size)
    # Fused kernels round differently from the eager operators, no more.
    scale = expected.abs().max().item()
    error = (got - expected).abs().max().item()
    assert error <= 2e-2 * scale
    if exact_argmax:
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
    else:
        top2 = expected.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * error
        assert torch.equal(got.argmax(-1)[clear], expected.argmax(-1)[clear])


DECODE_SHAPES = [[1], [15], [16], [17], [31], [300], [2, 2], [1, 250], [5, 9, 33, 64, 100, 7]]


def _assert_every_decode_shape_fits_a_graph(runner: ModelRunner) -> None:
    graphs = counters["stats"]["unique_graphs"]
    compiled = runner.compiled
    assert compiled is not None
    before = compiled.steps
    # Serving runs a step no graph fits eagerly, silently; here it must raise.
    compiled.serving_stance = "fail_on_recompile"
    try:
        for lengths in DECODE_SHAPES:
            runner.execute(SchedulerOutput(chunks=_decodes(lengths)))
    finally:
        compiled.serving_stance = "eager_on_recompile"
    assert compiled.steps == before + len(DECODE_SHAPES)
    assert counters["stats"]["unique_graphs"] == graphs


def test_decode_batches_of_any_size_and_context_need_no_new_graph(runner: ModelRunner) -> None:
    _assert_every_decode_shape_fits_a_graph(runner)


def test_weight_sizes_equal_to_warmup_sizes_do_not_tie_the_graph_to_them() -> None:
    # Warm-up decodes at a context of 2 blocks + 1 token: a 3-block table and
    # a 48-wide mask. With 1536 inputs the down projection's int4 scales have
    # 48 groups, as in the bundled model; a graph that related the two sizes
    # would fit only contexts of 33 to 48 tokens.
    config = dataclasses.replace(tiny_llama_config(), intermediate_size=1536)
    int4 = _runner(compile_decode=True, quant="int4", config=config)
    int4.warmup()
    assert int4.compiled is not None and int4.compiled.graphs == 2
    _assert_every_decode_shape_fits_a_graph(int4)


def test_steps_with_a_prefill_run_eagerly(runner: ModelRunner) -> None:
    compiled = runner.compiled
    assert compiled is not None
    before = compiled.steps
    prompt = ScheduledChunk("p", [4] * 20, 0, _blocks(7), True, GREEDY, 0)
    runner.execute(SchedulerOutput(chunks=[prompt, *_decodes([30])]))
    assert compiled.steps == before


def test_a_failed_compile_leaves_the_runner_serving_eagerly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(CompiledDecode, "__call__", broken)
    eager = _runner(compile_decode=True)
    eager.warmup()
    assert eager.compiled is None
    _prefill(eager, [12])
    out = eager.execute(SchedulerOutput(chunks=_decodes([12])))
    assert list(out.sampled) == ["r0"]


def test_a_pool_too_small_to_warm_up_in_serves_eagerly() -> None:
    model = build_synthetic_model(tiny_llama_config(), torch.float32, CPU, max_positions=512)
    small = ModelRunner(
        ModelConfig(device="cpu", compile=True),
        CacheConfig(block_size=BLOCK, num_blocks=1),
        SchedulerConfig(max_model_len=512),
        model=model,
    )
    assert small.compiled is not None
    small.warmup()
    # Compiling at the first request would stall it for the whole compile.
    assert small.compiled is None


def test_int4_decode_batches_above_the_kernel_row_limit_run_eagerly() -> None:
    int4 = _runner(compile_decode=True, quant="int4")
    int4.warmup()
    compiled = int4.compiled
    assert compiled is not None
    if compiled.max_batch is None:
        pytest.skip("int4 has a fused CPU kernel only in bfloat16 (CPUs with native bf16)")
    # The batch-2 graph took the fused kernel; a batch above its row limit
    # would fail the graph's guards, so it must not reach the graph at all.
    rows = compiled.max_batch + 1
    prompts = [
        ScheduledChunk(f"q{i}", [i + 1] * 20, 0, [2 * i, 2 * i + 1], True, GREEDY, 0)
        for i in range(rows)
    ]
    int4.execute(SchedulerOutput(chunks=prompts))
    compiled.serving_stance = "fail_on_recompile"
    before = compiled.steps
    for size in (rows, rows - 1):
        decodes = [
            ScheduledChunk(f"q{i}", [7], 20, [2 * i, 2 * i + 1], True, GREEDY, 1)
            for i in range(size)
        ]
        out = int4.execute(SchedulerOutput(chunks=decodes))
        assert len(out.sampled) == size
    assert compiled.steps == before + 1
