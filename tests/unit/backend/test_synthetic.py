"""Synthetic models: built through the loader's path, served by the engine, exported to HF."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from backend.config import CacheConfig, ModelConfig, SchedulerConfig  # noqa: E402
from backend.engine.core import EngineCore  # noqa: E402
from backend.engine.request import Request, SamplingParams  # noqa: E402
from backend.executor.model_runner import ModelRunner  # noqa: E402
from backend.executor.quant import Fp8Linear, Int4Linear  # noqa: E402
from backend.kv_cache.manager import KVCacheManager  # noqa: E402
from backend.models.hf_export import build_hf_model  # noqa: E402
from backend.models.llama import LlamaForCausalLM  # noqa: E402
from backend.models.synthetic import (  # noqa: E402
    build_synthetic_model,
    llama_3_1_8b_config,
    random_state_dict,
    tiny_llama_config,
)
from backend.scheduler.scheduler import Scheduler  # noqa: E402

PROMPTS = [[5, 17, 300, 2, 9, 44, 101], [7] * 20, [250, 251, 252]]
NEW_TOKENS = 8


def test_the_8b_config_has_8b_parameters() -> None:
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_3_1_8b_config())
    count = sum(p.numel() for p in model.parameters())
    assert math.isclose(count, 8.03e9, rel_tol=0.01)


def test_random_weights_are_seeded_and_shaped_like_the_model() -> None:
    config = tiny_llama_config()
    one = random_state_dict(config, torch.float32, "cpu", seed=1)
    again = random_state_dict(config, torch.float32, "cpu", seed=1)
    other = random_state_dict(config, torch.float32, "cpu", seed=2)
    name = "layers.0.attention.wqkv.weight"
    assert torch.equal(one[name], again[name]) and not torch.equal(one[name], other[name])
    assert torch.equal(one["norm.weight"], torch.ones(config.hidden_size))


@pytest.mark.parametrize(("quant", "layer"), [("int4", Int4Linear), ("fp8", Fp8Linear)])
def test_quantized_synthetic_models_run(quant: str, layer: type) -> None:
    model = build_synthetic_model(
        tiny_llama_config(),
        torch.bfloat16,
        "cpu",
        quant=quant,  # type: ignore[arg-type]
        max_positions=64,
    )
    assert isinstance(model.layers[0].feed_forward.w13, layer)
    tokens = _engine_generate(model, PROMPTS[:1], max_tokens=3)
    assert len(tokens[0]) == 3


def _engine_generate(model, prompts, max_tokens=NEW_TOKENS):
    """Greedy completions through scheduler, engine core and runner."""
    scheduler_config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64)
    runner = ModelRunner(
        ModelConfig(device="cpu"),
        CacheConfig(block_size=4, num_blocks=64),
        scheduler_config,
        model=model,
    )
    core = EngineCore(Scheduler(scheduler_config, KVCacheManager(runner.num_blocks, 4)), runner)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        core.add_request(Request(f"r{i}", list(prompt), params))
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while core.has_unfinished():
        for update in core.step():
            out[update.request_id] += update.new_token_ids
    return [out[f"r{i}"] for i in range(len(prompts))]


def test_the_engine_serves_a_synthetic_model_like_transformers() -> None:
    model = build_synthetic_model(tiny_llama_config(), torch.float32, "cpu", max_positions=64)
    ours = _engine_generate(model, PROMPTS)
    hf = build_hf_model(model)
    for prompt, tokens in zip(PROMPTS, ours, strict=True):
        with torch.inference_mode():
            generated = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=0,
            )
        assert generated[0, len(prompt) :].tolist() == tokens


def test_a_runner_over_an_in_memory_model_has_no_tokenizer() -> None:
    model = build_synthetic_model(tiny_llama_config(), torch.float32, "cpu", max_positions=64)
    runner = ModelRunner(
        ModelConfig(device="cpu"), CacheConfig(num_blocks=8), SchedulerConfig(), model=model
    )
    assert runner.max_model_len == 64 and runner.model_dir is None
    assert not runner.use_cuda_graphs and not runner.paged_kernel
    with pytest.raises(RuntimeError, match="without a tokenizer"):
        _ = runner.tokenizer
