"""Per-request block tables on top of the block pool, with prefix caching."""

from __future__ import annotations

from collections.abc import Sequence

from backend.engine.request import Request
from backend.kv_cache.block_pool import BlockPool, KVCacheBlock
from backend.kv_cache.hashing import BlockHash, extend_block_hashes


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Maps each request to the KV blocks holding its tokens, in position order.

    Full blocks are registered in the prefix cache once their tokens have been
    computed (`cache_blocks`), never before: a block whose KV is still being
    written must not be handed to another request.
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # Hashes grow with the request and are computed once each, so a long
        # prompt is not re-hashed on every step.
        self.req_to_block_hashes: dict[str, list[BlockHash]] = {}
        self.req_to_num_cached_blocks: dict[str, int] = {}
        self.prefix_cache_queries = 0
        """Tokens looked up in the prefix cache at admission."""
        self.prefix_cache_hits = 0
        """Tokens served from the prefix cache at admission."""

    @property
    def num_blocks(self) -> int:
        """Blocks in the pool."""
        return self.block_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks not held by any request."""
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests, 0..1."""
        return self.block_pool.usage

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table as block ids, in position order."""
        return [block.block_id for block in self.req_to_blocks.get(request_id, ())]

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest chain of cached full blocks at the start of the request's tokens.

        Returns the blocks and the number of tokens they hold. The last token is
        never served from the cache: it must be computed to get logits to sample from.
        Takes no references; pass the blocks to `allocate_slots` right away.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        block_hashes = self._block_hashes(request, max_blocks)
        computed: list[KVCacheBlock] = []
        for block_hash in block_hashes[:max_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            computed.append(block)
        return computed, len(computed) * self.block_size

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock] = (),
    ) -> list[KVCacheBlock] | None:
        """Make room for `num_new_tokens` more tokens after the computed ones.

        `new_computed_blocks` are prefix-cache hits from `get_computed_blocks`,
        only allowed when the request holds no blocks yet (admission). Returns
        the newly allocated blocks (possibly none), or None without any change
        when the pool is short.
        """
        request_id = request.request_id
        table = self.req_to_blocks.get(request_id)
        if new_computed_blocks and table:
            raise ValueError(f"request {request_id} already holds blocks")
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_required = _cdiv(num_computed + num_new_tokens, self.block_size)
        num_held = len(table) if table else 0
        num_new_blocks = max(0, num_required - num_held - len(new_computed_blocks))
        # Hits on free blocks leave the free queue when touched, so they cannot
        # also be counted as room for new blocks.
        num_free_hits = sum(1 for block in new_computed_blocks if block.ref_cnt == 0)
        if num_new_blocks > self.block_pool.num_free_blocks - num_free_hits:
            return None

        if table is None:
            table = self.req_to_blocks[request_id] = []
            self.req_to_num_cached_blocks[request_id] = len(new_computed_blocks)
            if self.enable_prefix_caching:
                self.prefix_cache_queries += request.num_tokens
                self.prefix_cache_hits += len(new_computed_blocks) * self.block_size
        self.block_pool.touch(new_computed_blocks)
        table.extend(new_computed_blocks)
        new_blocks = self.block_pool.allocate(num_new_blocks)
        assert new_blocks is not None  # room was checked above
        table.extend(new_blocks)
        return new_blocks

    def cache_blocks(self, request: Request) -> None:
        """Register the request's full blocks whose tokens have now been computed."""
        if not self.enable_prefix_caching:
            return
        request_id = request.request_id
        table = self.req_to_blocks.get(request_id)
        if table is None:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(table))
        num_cached = self.req_to_num_cached_blocks[request_id]
        if num_full <= num_cached:
            return
        block_hashes = self._block_hashes(request, num_full)
        for i in range(num_cached, num_full):
            self.block_pool.cache_full_block(table[i], block_hashes[i])
        self.req_to_num_cached_blocks[request_id] = num_full

    def free(self, request: Request) -> None:
        """Release every block the request holds and forget it.

        The tail of the table is freed first so it is evicted first: the start
        of a sequence is the part most likely to be shared.
        """
        request_id = request.request_id
        table = self.req_to_blocks.pop(request_id, None)
        self.req_to_num_cached_blocks.pop(request_id, None)
        self.req_to_block_hashes.pop(request_id, None)
        if table:
            self.block_pool.free(reversed(table))

    def _block_hashes(self, request: Request, num_blocks: int) -> list[BlockHash]:
        block_hashes = self.req_to_block_hashes.setdefault(request.request_id, [])
        if len(block_hashes) < num_blocks:
            extend_block_hashes(
                block_hashes,
                request.prompt_token_ids,
                request.output_token_ids,
                self.block_size,
                num_blocks,
            )
        return block_hashes
