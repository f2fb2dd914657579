"""The paged Llama-family model against transformers on tiny random checkpoints."""

from __future__ import annotations

import dataclasses
import random

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from backend.engine.request import SamplingParams  # noqa: E402
from backend.executor.model_runner import prepare_batch  # noqa: E402
from backend.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402
from backend.models.loader import convert_hf_state_dict  # noqa: E402
from backend.scheduler.output import ScheduledChunk  # noqa: E402

BLOCK_SIZE = 4
NUM_BLOCKS = 32
GREEDY = SamplingParams(temperature=0.0)
TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def _pair(hf_config):
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    hf_model.eval()
    with torch.no_grad():
        # Initialization zeroes biases and sets norms to one; perturb them so the
        # comparison would notice a bias or norm weight loaded in the wrong place.
        for name, param in hf_model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.2)
    config = LlamaConfig.from_hf(hf_config.to_dict())
    model = LlamaForCausalLM(config)
    model.load_state_dict(convert_hf_state_dict(hf_model.state_dict(), config))
    model.setup_rope("cpu")
    return hf_model, model.eval()


def _caches(config: LlamaConfig):
    shape = (NUM_BLOCKS, BLOCK_SIZE, config.num_kv_heads, config.head_dim)
    return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_layers)]


def _run(model, caches, chunks):
    """Logits for every token of the step's chunks, in flat order."""
    input_ids, meta = prepare_batch(chunks, BLOCK_SIZE, torch.device("cpu"))
    meta = dataclasses.replace(meta, logits_index=torch.arange(len(input_ids)))
    with torch.inference_mode():
        return model(input_ids, meta, caches)


CONFIGS = {
    "llama": transformers.LlamaConfig(**TINY),
    "llama3-rope": transformers.LlamaConfig(
        **TINY,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "qwen2-bias": transformers.Qwen2Config(**TINY),
    "mistral": transformers.MistralConfig(**TINY, sliding_window=None),
    "tied": transformers.LlamaConfig(**TINY, tie_word_embeddings=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_chunked_paged_forward_matches_transformers(name: str) -> None:
    hf_model, model = _pair(CONFIGS[name])
    ids = random.Random(1).choices(range(TINY["vocab_size"]), k=19)
    other = random.Random(2).choices(range(TINY["vocab_size"]), k=9)
    with torch.inference_mode():
        expected = hf_model(torch.tensor([ids])).logits[0]
        expected_other = hf_model(torch.tensor([other])).logits[0]
    # Scattered, non-contiguous blocks prove attention follows the block table.
    blocks = [7, 2, 30, 11, 5]
    other_blocks = [1, 20, 9]
    caches = _caches(model.config)
    got = []
    # Prefill in uneven chunks, then decodes; the other request joins mid-way so a
    # decode and a prefill chunk share a step.
    spans = [(0, 6), (6, 9), (9, 10), (10, 16), (16, 17), (17, 18), (18, 19)]
    for step, (start, end) in enumerate(spans):
        chunks = [ScheduledChunk("a", ids[start:end], start, blocks, True, GREEDY, 0)]
        if step == 2:
            chunks.append(ScheduledChunk("b", other[:8], 0, other_blocks, True, GREEDY, 0))
        if step == 3:
            chunks.insert(0, ScheduledChunk("b", other[8:], 8, other_blocks, True, GREEDY, 0))
        logits = _run(model, caches, chunks)
        if step == 2:
            torch.testing.assert_close(logits[1:], expected_other[:8], atol=1e-4, rtol=1e-4)
            logits = logits[:1]
        if step == 3:
            torch.testing.assert_close(logits[:1], expected_other[8:], atol=1e-4, rtol=1e-4)
            logits = logits[1:]
        got.append(logits)
    torch.testing.assert_close(torch.cat(got), expected, atol=1e-4, rtol=1e-4)


def test_config_parsing() -> None:
    qwen = LlamaConfig.from_hf(CONFIGS["qwen2-bias"].to_dict())
    assert qwen.qkv_bias and not qwen.o_bias
    assert qwen.head_dim == 16 and qwen.num_kv_heads == 2
    llama3 = LlamaConfig.from_hf(CONFIGS["llama3-rope"].to_dict())
    assert llama3.rope_scaling is not None and llama3.rope_scaling.kind == "llama3"
    legacy = LlamaConfig.from_hf(
        {**CONFIGS["llama"].to_dict(), "rope_parameters": None, "rope_theta": 500000.0}
    )
    assert legacy.rope_theta == 500000.0
    windowed = LlamaConfig.from_hf({**CONFIGS["mistral"].to_dict(), "sliding_window": 64})
    assert windowed.max_position_embeddings == 64
    with pytest.raises(ValueError, match="model_type"):
        LlamaConfig.from_hf({**CONFIGS["llama"].to_dict(), "model_type": "gpt2"})


def test_decodes_split_by_context_length_match_each_sequence_alone() -> None:
    from backend.executor.model_runner import MIN_GROUP, split_by_context

    _, model = _pair(CONFIGS["llama"])
    rng = random.Random(3)
    # Contexts from 1 to 40 tokens: long enough apart that the step splits them.
    lengths = [40, 37, 33, 30, 21, 19, 17, 16, 9, 7, 4, 2, 1]
    prompts = [rng.choices(range(TINY["vocab_size"]), k=n) for n in lengths]
    shape = (96, BLOCK_SIZE, model.config.num_kv_heads, model.config.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(model.config.num_layers)]
    free = iter(rng.sample(range(96), 96))
    tables = [[next(free) for _ in range(-(-(n + 1) // BLOCK_SIZE))] for n in lengths]
    # Fill each cache by a prefill of all but the last token, then decode the
    # last tokens of every sequence in one step.
    for i, (prompt, table) in enumerate(zip(prompts, tables, strict=True)):
        if len(prompt) > 1:
            _run(model, caches, [ScheduledChunk(f"r{i}", prompt[:-1], 0, table, True, GREEDY, 0)])
    decodes = [
        ScheduledChunk(f"r{i}", prompt[-1:], len(prompt) - 1, table, True, GREEDY, 0)
        for i, (prompt, table) in enumerate(zip(prompts, tables, strict=True))
    ]
    groups = split_by_context([(chunk, i) for i, chunk in enumerate(decodes)])
    assert len(groups) > 1
    assert sorted(i for group in groups for _, i in group) == list(range(len(decodes)))
    for group in groups:
        assert len(group) >= MIN_GROUP
    together = _run(model, caches, decodes)
    for i, chunk in enumerate(decodes):
        alone = _run(model, caches, [chunk])
        torch.testing.assert_close(together[i : i + 1], alone, atol=1e-5, rtol=1e-5)


def test_a_few_decodes_stay_in_one_group() -> None:
    from backend.executor.model_runner import MIN_GROUP, split_by_context

    chunks = [
        (ScheduledChunk(f"r{i}", [1], n, [0] * 64, True, GREEDY, 0), i)
        for i, n in enumerate([200, 3, 150, 1, 90][: 2 * MIN_GROUP - 1])
    ]
    assert split_by_context(chunks) == [chunks]


def test_a_bfloat16_kv_cache_under_a_float32_model_stays_close() -> None:
    # bfloat16 keeps 8 bits of mantissa: keys and values round by up to 2^-9
    # relative, and logits move by about that much times their scale.
    hf_model, model = _pair(CONFIGS["llama"])
    ids = random.Random(4).choices(range(TINY["vocab_size"]), k=23)
    with torch.inference_mode():
        expected = hf_model(torch.tensor([ids])).logits[0]
    shape = (NUM_BLOCKS, BLOCK_SIZE, model.config.num_kv_heads, model.config.head_dim)
    caches = [
        (torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16))
        for _ in range(model.config.num_layers)
    ]
    blocks = [3, 17, 8, 25, 12, 6]
    got = [_run(model, caches, [ScheduledChunk("a", ids[:15], 0, blocks, True, GREEDY, 0)])]
    for pos in range(15, len(ids)):
        chunk = ScheduledChunk("a", ids[pos : pos + 1], pos, blocks, True, GREEDY, 0)
        got.append(_run(model, caches, [chunk]))
    logits = torch.cat(got)
    assert logits.dtype == torch.float32
    assert caches[0][0].dtype == torch.bfloat16
    scale = expected.abs().max().item()
    assert (logits - expected).abs().max().item() < 0.01 * scale
    assert (logits - expected).abs().max().item() > 0  # the cache really was narrower
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))
