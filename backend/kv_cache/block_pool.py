"""The pool of KV blocks: reference counts, an LRU free queue and the prefix-cache map.

A block is in exactly one of two places: held by one or more requests
(`ref_cnt > 0`) or in the free queue (`ref_cnt == 0`). A free block may still
carry the hash of the full block it holds, so a later request with the same
prefix can take it back (`touch`) instead of recomputing it. Allocation takes
blocks from the head of the free queue, which is the least recently freed, and
only then forgets what they held.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from backend.kv_cache.hashing import BlockHash


@dataclass(eq=False)
class KVCacheBlock:
    """One block of the paged KV cache.

    Compared by identity: two blocks are never interchangeable.
    """

    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    """Set while the block holds a registered full block of some prefix."""


class BlockPool:
    """Owns every KV block and hands them out; never raises for lack of blocks.

    `allocate` returns None when the pool cannot satisfy a request in full, so
    the scheduler can decide whom to preempt.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks: list[KVCacheBlock] = [KVCacheBlock(block_id=i) for i in range(num_blocks)]
        self.hash_to_block: dict[BlockHash, KVCacheBlock] = {}
        # OrderedDict gives O(1) pop from the head, append at the tail and
        # removal from the middle (a cache hit on a free block).
        self._free_queue: OrderedDict[int, KVCacheBlock] = OrderedDict(
            (block.block_id, block) for block in self.blocks
        )

    @property
    def num_free_blocks(self) -> int:
        """Blocks not held by any request, cached or not."""
        return len(self._free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests, 0..1."""
        return 1.0 - len(self._free_queue) / self.num_blocks

    def free_block_ids(self) -> list[int]:
        """Free block ids in eviction order: the first is reused first."""
        return list(self._free_queue)

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        """The block registered under `block_hash`, free or held, if any."""
        return self.hash_to_block.get(block_hash)

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on cache hits, pulling free ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free_queue[block.block_id]
            block.ref_cnt += 1

    def allocate(self, num_blocks: int) -> list[KVCacheBlock] | None:
        """Take `num_blocks` blocks from the head of the free queue, or None if too few.

        Never allocates part of the request. A reused block forgets the prefix
        it held, so its hash no longer leads to it.
        """
        if num_blocks > len(self._free_queue):
            return None
        allocated: list[KVCacheBlock] = []
        for _ in range(num_blocks):
            _, block = self._free_queue.popitem(last=False)
            self._evict_hash(block)
            block.ref_cnt = 1
            allocated.append(block)
        return allocated

    def free(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each block; blocks reaching zero join the free queue.

        Blocks join the tail in the order given, so pass them in the order they
        should be evicted (a request's table reversed: its tail goes first).
        """
        for block in blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} freed more often than taken")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free_queue[block.block_id] = block

    def cache_full_block(self, block: KVCacheBlock, block_hash: BlockHash) -> bool:
        """Register a full, computed block under its chained hash.

        Returns False (and leaves the block unregistered) when caching is off,
        the block already carries a hash, or another block already holds the
        same prefix: the first copy stays the one that is shared.
        """
        if not self.enable_caching or block.block_hash is not None:
            return False
        if block_hash in self.hash_to_block:
            return False
        block.block_hash = block_hash
        self.hash_to_block[block_hash] = block
        return True

    def _evict_hash(self, block: KVCacheBlock) -> None:
        if block.block_hash is None:
            return
        if self.hash_to_block.get(block.block_hash) is block:
            del self.hash_to_block[block.block_hash]
        block.block_hash = None
