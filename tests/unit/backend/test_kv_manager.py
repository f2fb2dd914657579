"""Block tables, slot allocation and prefix-cache reuse in the KV cache manager."""

from __future__ import annotations

import pytest

from backend.engine.request import Request, SamplingParams
from backend.kv_cache.hashing import ROOT_PARENT_HASH, hash_block_tokens
from backend.kv_cache.manager import KVCacheManager


def make_request(request_id: str, prompt: list[int]) -> Request:
    return Request(request_id=request_id, prompt_token_ids=prompt, sampling=SamplingParams())


def compute(kv: KVCacheManager, request: Request, num_tokens: int) -> None:
    """Allocate and mark `num_tokens` more tokens computed, as the scheduler would."""
    assert kv.allocate_slots(request, num_tokens) is not None
    request.num_computed_tokens += num_tokens
    kv.cache_blocks(request)


def test_allocate_slots_grows_the_table_by_whole_blocks() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    req = make_request("a", list(range(10)))
    new = kv.allocate_slots(req, 10)
    assert new is not None
    assert [b.block_id for b in new] == [0, 1, 2]
    assert kv.block_ids("a") == [0, 1, 2]
    req.num_computed_tokens = 10
    req.output_token_ids.append(99)
    # Position 10 still fits in block 2.
    assert kv.allocate_slots(req, 1) == []
    req.num_computed_tokens = 11
    req.output_token_ids.append(98)
    assert kv.allocate_slots(req, 1) == []
    req.num_computed_tokens = 12
    req.output_token_ids.append(97)
    new = kv.allocate_slots(req, 1)
    assert new is not None
    assert [b.block_id for b in new] == [3]
    assert kv.block_ids("a") == [0, 1, 2, 3]
    assert kv.num_free_blocks == 4
    assert kv.usage == pytest.approx(0.5)


def test_allocate_slots_returns_none_and_changes_nothing_when_short() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a = make_request("a", list(range(8)))
    b = make_request("b", list(range(100, 108)))
    assert kv.allocate_slots(a, 8) is not None
    assert kv.allocate_slots(b, 8) is None
    assert kv.block_ids("b") == []
    assert kv.num_free_blocks == 1
    assert kv.prefix_cache_queries == 8  # only the successful admission counted


def test_full_blocks_are_registered_once_computed_with_chained_hashes() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    req = make_request("a", list(range(10)))
    assert kv.allocate_slots(req, 10) is not None
    # Nothing is cached before the tokens are computed.
    assert kv.block_pool.hash_to_block == {}
    req.num_computed_tokens = 6
    kv.cache_blocks(req)
    h0 = hash_block_tokens(ROOT_PARENT_HASH, [0, 1, 2, 3])
    assert kv.block_pool.get_cached_block(h0) is kv.req_to_blocks["a"][0]
    assert len(kv.block_pool.hash_to_block) == 1
    req.num_computed_tokens = 10
    kv.cache_blocks(req)
    h1 = hash_block_tokens(h0, [4, 5, 6, 7])
    assert kv.block_pool.get_cached_block(h1) is kv.req_to_blocks["a"][1]
    assert len(kv.block_pool.hash_to_block) == 2  # block 2 is partial


def test_output_tokens_are_part_of_the_cached_chain() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    req = make_request("a", [1, 2, 3])
    compute(kv, req, 3)
    req.output_token_ids.append(4)
    compute(kv, req, 1)
    h0 = hash_block_tokens(ROOT_PARENT_HASH, [1, 2, 3, 4])
    assert kv.block_pool.get_cached_block(h0) is kv.req_to_blocks["a"][0]


def test_prefix_hit_shares_blocks_and_never_covers_the_whole_prompt() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_request("a", list(range(12)))
    compute(kv, a, 12)
    assert len(kv.block_pool.hash_to_block) == 3

    b = make_request("b", list(range(12)))  # same prompt: last block must be recomputed
    blocks, num_tokens = kv.get_computed_blocks(b)
    assert [blk.block_id for blk in blocks] == [0, 1]
    assert num_tokens == 8

    c = make_request("c", [*range(8), 50, 51, 52, 53, 54])
    blocks_c, num_c = kv.get_computed_blocks(c)
    assert [blk.block_id for blk in blocks_c] == [0, 1]
    assert num_c == 8

    new = kv.allocate_slots(b, 12 - num_tokens, blocks)
    assert new is not None
    assert [blk.block_id for blk in new] == [3]
    assert kv.block_ids("b") == [0, 1, 3]
    assert [blk.ref_cnt for blk in kv.req_to_blocks["b"]] == [2, 2, 1]
    assert kv.prefix_cache_queries == 12 + 12
    assert kv.prefix_cache_hits == 8


def test_hit_chain_stops_at_the_first_miss() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=2)
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7])
    compute(kv, a, 7)
    b = make_request("b", [1, 2, 9, 9, 5, 6, 7])  # block 2 equal but after a different block 1
    blocks, num_tokens = kv.get_computed_blocks(b)
    assert [blk.block_id for blk in blocks] == [0]
    assert num_tokens == 2


def test_free_releases_the_tail_first_and_cached_blocks_come_back() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=4)
    a = make_request("a", list(range(10)))
    compute(kv, a, 10)
    kv.free(a)
    assert kv.block_ids("a") == []
    assert kv.block_pool.free_block_ids() == [3, 4, 5, 2, 1, 0]
    assert kv.num_free_blocks == 6

    b = make_request("b", list(range(9)))
    blocks, num_tokens = kv.get_computed_blocks(b)
    assert [blk.block_id for blk in blocks] == [0, 1]
    new = kv.allocate_slots(b, 9 - num_tokens, blocks)
    assert new is not None
    assert [blk.block_id for blk in new] == [3]
    assert kv.block_pool.free_block_ids() == [4, 5, 2]
    assert [blk.ref_cnt for blk in kv.req_to_blocks["b"]] == [1, 1, 1]


def test_hits_on_free_blocks_do_not_count_as_room() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=2)
    a = make_request("a", [1, 2, 3, 4, 5])
    compute(kv, a, 5)
    kv.free(a)
    assert kv.num_free_blocks == 3
    # Two hits (both free) plus four more tokens would need two new blocks: 4 > 3.
    b = make_request("b", [1, 2, 3, 4, 6, 7, 8, 9])
    blocks, num_tokens = kv.get_computed_blocks(b)
    assert num_tokens == 4
    assert kv.allocate_slots(b, 4, blocks) is None
    assert kv.num_free_blocks == 3
    assert all(blk.ref_cnt == 0 for blk in blocks)
    # With room for one new block it fits, and the hits are reused in place.
    new = kv.allocate_slots(b, 1, blocks)
    assert new is not None
    assert kv.block_ids("b") == [blocks[0].block_id, blocks[1].block_id, new[0].block_id]
    assert kv.num_free_blocks == 0


def test_computed_blocks_only_at_admission() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = make_request("a", [1, 2, 3])
    compute(kv, a, 3)
    b = make_request("b", [1, 2, 3])
    blocks, _ = kv.get_computed_blocks(b)
    assert kv.allocate_slots(b, 1, blocks) is not None
    with pytest.raises(ValueError):
        kv.allocate_slots(b, 1, blocks)


def test_prefix_caching_disabled() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    a = make_request("a", [1, 2, 3, 4, 5])
    compute(kv, a, 5)
    assert kv.block_pool.hash_to_block == {}
    b = make_request("b", [1, 2, 3, 4, 5])
    assert kv.get_computed_blocks(b) == ([], 0)
    assert kv.prefix_cache_queries == 0
    assert kv.prefix_cache_hits == 0


def test_free_forgets_everything_about_the_request() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = make_request("a", [1, 2, 3, 4, 5])
    kv.get_computed_blocks(a)
    compute(kv, a, 5)
    kv.free(a)
    assert kv.req_to_blocks == {}
    assert kv.req_to_block_hashes == {}
    assert kv.req_to_num_cached_blocks == {}
    kv.free(a)  # freeing twice is harmless
    assert kv.num_free_blocks == 4
