"""Block pool and KV manager invariants: reference counts, LRU revival, chunk freeing, prefix
matching for both KV groups."""

import pytest

from deployments.engine.block_pool import BlockPool, NoFreeBlocks, block_hash, salted_root
from deployments.engine.kv_manager import KVGroup, KVManager
from deployments.engine.sequence import Sequence


def test_allocate_free_and_exhaust():
    pool = BlockPool(3)
    blocks = [pool.allocate() for _ in range(3)]
    assert sorted(blocks) == [0, 1, 2] and pool.num_free == 0
    with pytest.raises(NoFreeBlocks):
        pool.allocate()
    pool.free(blocks[1])
    assert pool.num_free == 1 and pool.allocate() == blocks[1]
    with pytest.raises(AssertionError, match="double free"):
        pool.free(blocks[0]), pool.free(blocks[0])


def test_cached_blocks_are_revived_then_evicted_lru():
    pool = BlockPool(2)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, b"ha", [1, 2])
    pool.register(b, b"hb", [3, 4])
    pool.free(a), pool.free(b)
    assert pool.num_free == 2 and pool.num_cached == 2
    assert pool.lookup(b"ha", [1, 2]) == a  # revived, referenced again
    assert pool.lookup(b"hb", [9, 9]) is None  # same hash, other tokens: a collision is a miss
    assert pool.allocate() == b  # evicts the only free cached block
    assert not pool.peek(b"hb", [3, 4]) and pool.peek(b"ha", [1, 2])


def test_hash_chain_depends_on_everything():
    root = salted_root("")
    h = block_hash(root, [1, 2, 3])
    assert h != block_hash(root, [1, 2, 4])
    assert h != block_hash(salted_root("tenant-a"), [1, 2, 3])
    assert h != block_hash(root, [1, 2, 3], extra=["image-digest"])
    assert block_hash(h, [5]) != block_hash(block_hash(root, [1, 2, 4]), [5])


def _seq(tokens, rid="r"):
    return Sequence(request_id=rid, tokens=list(tokens), num_prompt_tokens=len(tokens), params=None, arrival=0)


def _manager(chunk=8, blocks=64, bs=4):
    return KVManager([KVGroup("chunked", (0, 1, 2), chunk, blocks), KVGroup("full", (3,), None, blocks)], bs)


def test_chunked_group_frees_past_chunks_full_group_keeps_all():
    kv = _manager()
    seq = _seq(range(20))
    assert kv.allocate(seq, 20)
    seq.num_computed = 20
    kv.after_step(seq)
    # next position 20 is in chunk [16, 24): blocks 0..3 (positions 0..15) of the chunked group go
    assert seq.tables["chunked"][:4] == [-1] * 4 and seq.tables["chunked"][4] >= 0
    assert all(b >= 0 for b in seq.tables["full"])
    assert kv.pools["chunked"].num_used == 1 and kv.pools["full"].num_used == 5
    kv.free(seq)
    assert all(p.num_used == 0 for p in kv.pools.values())


def test_prefix_match_takes_full_blocks_and_the_current_chunk():
    kv = _manager()
    first = _seq(range(22), "a")
    kv.allocate(first, 22)
    first.num_computed = 22
    kv.after_step(first)
    kv.free(first)
    second = _seq(list(range(22)) + [99, 98], "b")
    hit = kv.match_prefix(second)
    assert hit == 20  # 5 full blocks; the chunk of position 20 starts at 16 -> chunked block 4 needed
    assert second.tables["chunked"][:4] == [-1] * 4 and second.tables["chunked"][4] >= 0
    assert len(second.tables["full"]) == 5 and second.num_computed == 20


def test_prefix_match_shrinks_when_the_chunk_blocks_are_gone():
    kv = _manager(blocks=64)
    first = _seq(range(22), "a")
    kv.allocate(first, 22)
    first.num_computed = 22
    kv.after_step(first)  # next position 22: chunk [16, 24) -> chunked blocks 0..3 freed, block 4 kept
    kv.free(first)
    chunked = kv.pools["chunked"]
    for block in list(chunked._cached_free):  # evict every cached chunked block
        chunked._forget(block)
    chunked._free.extend(chunked._cached_free)
    chunked._cached_free.clear()
    second = _seq(range(30), "b")
    # 5 full blocks are cached, but a 20-token prefix needs chunked block 4 (chunk [16, 24)), which
    # is gone; a 16-token prefix starts a new chunk and needs no chunked block.
    assert kv.match_prefix(second) == 16
    assert second.tables["chunked"] == [-1] * 4 and len(second.tables["full"]) == 4


def test_max_tokens_per_seq():
    assert _manager(blocks=10, bs=4).max_tokens_per_seq() == 40
