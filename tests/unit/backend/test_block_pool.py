"""Bookkeeping of the KV block pool: exact block ids, ref counts and eviction order."""

from __future__ import annotations

import pytest

from backend.kv_cache.block_pool import BlockPool
from backend.kv_cache.hashing import ROOT_PARENT_HASH, extend_block_hashes, hash_block_tokens


def test_new_pool_is_all_free_in_id_order() -> None:
    pool = BlockPool(4)
    assert pool.num_free_blocks == 4
    assert pool.free_block_ids() == [0, 1, 2, 3]
    assert pool.usage == 0.0
    assert all(b.ref_cnt == 0 and b.block_hash is None for b in pool.blocks)


def test_pool_needs_a_block() -> None:
    with pytest.raises(ValueError):
        BlockPool(0)


def test_allocate_takes_from_the_head_with_one_reference() -> None:
    pool = BlockPool(5)
    blocks = pool.allocate(3)
    assert blocks is not None
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]
    assert pool.free_block_ids() == [3, 4]
    assert pool.usage == pytest.approx(0.6)


def test_allocate_is_all_or_nothing() -> None:
    pool = BlockPool(3)
    assert pool.allocate(2) is not None
    assert pool.allocate(2) is None
    assert pool.free_block_ids() == [2]
    zero = pool.allocate(0)
    assert zero == []


def test_free_appends_to_the_tail_in_the_order_given() -> None:
    pool = BlockPool(5)
    blocks = pool.allocate(3)
    assert blocks is not None
    pool.free(reversed(blocks))
    assert pool.free_block_ids() == [3, 4, 2, 1, 0]
    assert all(b.ref_cnt == 0 for b in blocks)
    again = pool.allocate(3)
    assert again is not None
    assert [b.block_id for b in again] == [3, 4, 2]


def test_shared_block_is_freed_only_at_ref_zero() -> None:
    pool = BlockPool(2)
    blocks = pool.allocate(1)
    assert blocks is not None
    block = blocks[0]
    pool.touch([block])
    assert block.ref_cnt == 2
    pool.free([block])
    assert block.ref_cnt == 1
    assert pool.free_block_ids() == [1]
    pool.free([block])
    assert block.ref_cnt == 0
    assert pool.free_block_ids() == [1, 0]


def test_double_free_is_an_error() -> None:
    pool = BlockPool(2)
    blocks = pool.allocate(1)
    assert blocks is not None
    pool.free(blocks)
    with pytest.raises(ValueError):
        pool.free(blocks)


def test_cached_free_block_can_be_touched_back_out_of_the_queue() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    assert blocks is not None
    assert pool.cache_full_block(blocks[0], 111)
    pool.free(reversed(blocks))
    assert pool.free_block_ids() == [2, 3, 1, 0]

    hit = pool.get_cached_block(111)
    assert hit is blocks[0]
    pool.touch([hit])
    assert hit.ref_cnt == 1
    assert hit.block_hash == 111
    assert pool.free_block_ids() == [2, 3, 1]
    assert pool.num_free_blocks == 3


def test_reusing_a_cached_free_block_evicts_its_hash() -> None:
    pool = BlockPool(2)
    blocks = pool.allocate(2)
    assert blocks is not None
    pool.cache_full_block(blocks[0], 7)
    pool.cache_full_block(blocks[1], 8)
    pool.free(blocks)  # 0 freed first -> evicted first
    assert pool.free_block_ids() == [0, 1]

    taken = pool.allocate(1)
    assert taken is not None
    assert taken[0].block_id == 0
    assert taken[0].block_hash is None
    assert pool.get_cached_block(7) is None
    assert pool.get_cached_block(8) is blocks[1]
    assert set(pool.hash_to_block) == {8}


def test_eviction_is_least_recently_freed_first() -> None:
    pool = BlockPool(3)
    a = pool.allocate(1)
    b = pool.allocate(1)
    c = pool.allocate(1)
    assert a and b and c
    for block, h in ((a[0], 1), (b[0], 2), (c[0], 3)):
        pool.cache_full_block(block, h)
    pool.free(b)
    pool.free(a)
    pool.free(c)
    # A hit on b refreshes nothing until it is freed again, then it goes last.
    pool.touch(b)
    pool.free(b)
    assert pool.free_block_ids() == [0, 2, 1]
    evicted = pool.allocate(2)
    assert evicted is not None
    assert [blk.block_id for blk in evicted] == [0, 2]
    assert pool.get_cached_block(1) is None
    assert pool.get_cached_block(3) is None
    assert pool.get_cached_block(2) is b[0]


def test_duplicate_hash_keeps_the_first_block() -> None:
    pool = BlockPool(2)
    blocks = pool.allocate(2)
    assert blocks is not None
    assert pool.cache_full_block(blocks[0], 5)
    assert not pool.cache_full_block(blocks[1], 5)
    assert blocks[1].block_hash is None
    assert not pool.cache_full_block(blocks[0], 6)  # already carries a hash
    assert pool.get_cached_block(5) is blocks[0]
    assert pool.get_cached_block(6) is None


def test_caching_disabled_registers_nothing() -> None:
    pool = BlockPool(2, enable_caching=False)
    blocks = pool.allocate(1)
    assert blocks is not None
    assert not pool.cache_full_block(blocks[0], 5)
    assert pool.get_cached_block(5) is None


def test_block_hashes_are_chained_and_stable() -> None:
    h0 = hash_block_tokens(ROOT_PARENT_HASH, [1, 2])
    assert h0 == hash_block_tokens(ROOT_PARENT_HASH, [1, 2])
    assert h0 != hash_block_tokens(ROOT_PARENT_HASH, [2, 1])
    # Same block content after a different prefix is a different hash.
    assert hash_block_tokens(h0, [3, 4]) != hash_block_tokens(ROOT_PARENT_HASH, [3, 4])

    hashes: list[int] = []
    extend_block_hashes(hashes, [1, 2, 3], [4, 5], block_size=2, num_blocks=10)
    assert hashes == [h0, hash_block_tokens(h0, [3, 4])]  # partial block [5] not hashed
    extend_block_hashes(hashes, [1, 2, 3], [4, 5, 6], block_size=2, num_blocks=1)
    assert len(hashes) == 2  # never shrinks or rehashes
