"""Chained block hashes for prefix caching.

The hash of block `i` covers the hash of block `i - 1` and the token ids of
block `i`, so equal hashes mean equal prefixes, not just equal blocks. Only
full blocks are hashed: a partial block can still change.

blake2b is used instead of Python's `hash()`: it is stable across processes
and Python versions (so hashes could be shared or logged meaningfully), and a
128-bit digest makes an accidental collision, which would silently serve
another prompt's KV, out of reach.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

BlockHash = int
"""A 128-bit chained block hash."""

ROOT_PARENT_HASH: BlockHash = 0
"""Parent hash of a sequence's first block."""

_DIGEST_SIZE = 16


def hash_block_tokens(parent_hash: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """Hash one full block given the hash of the block before it."""
    h = hashlib.blake2b(digest_size=_DIGEST_SIZE)
    h.update(parent_hash.to_bytes(_DIGEST_SIZE, "little"))
    # Signed 64-bit items: any realistic token id fits, and the byte layout is fixed.
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little")


def token_slice(prompt: Sequence[int], output: Sequence[int], start: int, end: int) -> list[int]:
    """Tokens `start .. end - 1` of `prompt + output`, without building the concatenation."""
    num_prompt = len(prompt)
    if end <= num_prompt:
        return list(prompt[start:end])
    if start >= num_prompt:
        return list(output[start - num_prompt : end - num_prompt])
    return list(prompt[start:]) + list(output[: end - num_prompt])


def extend_block_hashes(
    block_hashes: list[BlockHash],
    prompt: Sequence[int],
    output: Sequence[int],
    block_size: int,
    num_blocks: int,
) -> None:
    """Append hashes to `block_hashes` until it covers `num_blocks` full blocks.

    Hashes already in the list are kept, so a request's hashes are computed
    once each as its sequence grows. Blocks that are not full yet are skipped.
    """
    num_full = (len(prompt) + len(output)) // block_size
    target = min(num_blocks, num_full)
    parent = block_hashes[-1] if block_hashes else ROOT_PARENT_HASH
    for i in range(len(block_hashes), target):
        tokens = token_slice(prompt, output, i * block_size, (i + 1) * block_size)
        parent = hash_block_tokens(parent, tokens)
        block_hashes.append(parent)
