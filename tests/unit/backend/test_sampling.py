"""Batched sampling: greedy equivalences and seed reproducibility."""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")

from backend.engine.request import SamplingParams  # noqa: E402
from backend.executor.sampling import Sampler, derive_seed, row_parameters  # noqa: E402

VOCAB = 500


@pytest.fixture
def logits():
    return torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0)) * 3


def test_greedy_is_argmax(logits) -> None:
    tokens = Sampler("cpu")(logits, [SamplingParams(temperature=0.0)] * 4, [0] * 4)
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_top_k_one_and_tiny_top_p_equal_greedy(logits) -> None:
    sampler = Sampler("cpu", seed=0)
    greedy = logits.argmax(-1).tolist()
    top_k = [SamplingParams(temperature=1.5, top_k=1)] * 4
    tiny_p = [SamplingParams(temperature=1.5, top_p=1e-6)] * 4
    for _ in range(5):
        assert sampler(logits, top_k, [0] * 4).tolist() == greedy
        assert sampler(logits, tiny_p, [0] * 4).tolist() == greedy


def test_seeded_rows_do_not_depend_on_the_batch(logits) -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=7)
    alone = Sampler("cpu")(logits[1:2], [seeded], [3]).item()
    # Same row, other position in a batch of mixed requests, fresh sampler.
    mixed = [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=0.0),
        seeded,
        dataclasses.replace(seeded, seed=8),
    ]
    batch = torch.stack([logits[0], logits[2], logits[1], logits[3]])
    assert Sampler("cpu")(batch, mixed, [0, 0, 3, 3])[2].item() == alone


def test_seeds_and_token_index_change_the_draw() -> None:
    flat = torch.zeros(1, VOCAB)
    sampler = Sampler("cpu")
    draws = {
        sampler(flat, [SamplingParams(temperature=1.0, seed=s)], [0]).item() for s in range(20)
    }
    assert len(draws) > 10
    per_position = {
        sampler(flat, [SamplingParams(temperature=1.0, seed=1)], [n]).item() for n in range(20)
    }
    assert len(per_position) > 10


def test_top_k_and_top_p_restrict_the_support() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0] + [-1.0] * 20])
    sampler = Sampler("cpu", seed=1)
    top_k = {sampler(logits, [SamplingParams(top_k=2)], [0]).item() for _ in range(200)}
    assert top_k == {0, 1}
    probs = logits.softmax(-1)[0]
    # top_p just above p0 + p1 keeps exactly three tokens.
    p = float(probs[:2].sum()) + 1e-3
    top_p = {sampler(logits, [SamplingParams(top_p=p)], [0]).item() for _ in range(300)}
    assert top_p == {0, 1, 2}


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    sampler = Sampler("cpu", seed=3)
    params = [SamplingParams(temperature=1.0)] * 4000
    tokens = sampler(logits.expand(4000, 3), params, [0] * 4000)
    freq = torch.bincount(tokens, minlength=3).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03, rtol=0)


def test_derive_seed_is_stable_and_distinct() -> None:
    assert derive_seed(1, 0) == derive_seed(1, 0)
    assert len({derive_seed(s, n) for s in range(10) for n in range(10)}) == 100
    assert 0 <= derive_seed(2**70, 5) < 2**63


def test_row_parameters_travel_as_one_table() -> None:
    """All per-row parameters go to the device in one copy (one table, no host sync)."""
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=40, top_p=0.9),
        SamplingParams(temperature=1.5, top_k=1),
    ]
    table = row_parameters(params, VOCAB)
    assert table.dtype == torch.float32 and table.shape == (3, 4)
    assert table.tolist() == [
        [1.0, float(VOCAB), 1.0, 1.0],
        [0.699999988079071, 40.0, 0.8999999761581421, 0.0],
        [1.0, 1.0, 1.0, 1.0],  # top_k=1 is greedy
    ]
