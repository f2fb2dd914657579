"""Batched next-token sampling: greedy, temperature, top-k, top-p, per-request seeds.

Sampling uses the exponential race (argmax of `p / E` with `E ~ Exp(1)`), which picks
index `i` with probability `p_i`. A seeded request draws its noise from a generator
seeded by `(seed, num_generated)` alone, so its tokens do not depend on which other
requests share the batch, nor on whether it was preempted and recomputed.
Everything stays on the logits' device. The per-row parameters travel to it in
one asynchronous copy, and nothing here waits for the device: on CUDA the only
host sync of a step is the caller's one transfer of the sampled tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from backend.engine.request import SamplingParams

_MASK64 = (1 << 64) - 1


def derive_seed(seed: int, num_generated: int) -> int:
    """Mix a request seed and a token index into a 63-bit generator seed (splitmix64)."""
    z = (seed * 0x9E3779B97F4A7C15 + num_generated + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def row_parameters(params: Sequence[SamplingParams], vocab: int) -> Tensor:
    """`[N, 4]` float32 on the host: temperature, top-k, top-p, greedy (1.0 or 0.0) per row.

    Greedy rows get temperature 1 (their sampled token is discarded anyway) and a
    disabled top-k becomes `vocab`; float32 holds every vocabulary index exactly
    below 2**24.
    """
    return torch.tensor(
        [
            (
                1.0 if p.greedy else p.temperature,
                float(p.top_k if p.top_k > 0 else vocab),
                p.top_p,
                1.0 if p.greedy else 0.0,
            )
            for p in params
        ],
        dtype=torch.float32,
    )


class Sampler:
    """Samples one token per row of a logits batch."""

    def __init__(self, device: torch.device | str, seed: int | None = None) -> None:
        self.device = torch.device(device)
        self._generator = torch.Generator(device=self.device)
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)

    def __call__(
        self, logits: Tensor, params: Sequence[SamplingParams], num_generated: Sequence[int]
    ) -> Tensor:
        """Return `[N]` token ids for float logits `[N, vocab]`."""
        greedy_tokens = logits.argmax(dim=-1)
        greedy = [p.greedy for p in params]
        if all(greedy):
            return greedy_tokens
        device, (rows, vocab) = logits.device, logits.shape
        table = row_parameters(params, vocab).to(device, non_blocking=True)
        temperature, top_k, top_p, is_greedy = table.unbind(dim=1)
        scaled = logits.float() / temperature.unsqueeze(1)
        order: Tensor | None = None
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            scaled, order = scaled.sort(dim=-1, descending=True)
            ranks = torch.arange(vocab, device=device)
            scaled = scaled.masked_fill(ranks.unsqueeze(0) >= top_k.unsqueeze(1), -torch.inf)
        probs = scaled.softmax(dim=-1)
        if order is not None:
            top_p = top_p.unsqueeze(1)
            # Keep a token while the mass ranked before it is below top_p; the first
            # token is always kept, so a tiny top_p degenerates to greedy.
            outside = (probs.cumsum(dim=-1) - probs) >= top_p
            outside[:, 0] = False
            probs = probs.masked_fill(outside, 0.0)
        noise = self._noise(rows, vocab, params, num_generated)
        choice = (probs / noise).argmax(dim=-1)
        if order is not None:
            choice = order.gather(1, choice.unsqueeze(1)).squeeze(1)
        return torch.where(is_greedy > 0, greedy_tokens, choice)

    def _noise(
        self, rows: int, vocab: int, params: Sequence[SamplingParams], num_generated: Sequence[int]
    ) -> Tensor:
        noise = torch.empty(rows, vocab, device=self.device)
        noise.exponential_(generator=self._generator)
        for row, (p, n) in enumerate(zip(params, num_generated, strict=True)):
            if p.seed is not None and not p.greedy:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(derive_seed(p.seed, n))
                noise[row].exponential_(generator=generator)
        # A zero draw would divide a zero probability into NaN, which argmax prefers.
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)
