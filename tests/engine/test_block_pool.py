import pytest

from framework.engine.block_pool import BlockPool, KVCacheManager
from framework.engine.sequence import Sequence
from framework.sampling_params import SamplingParams


def test_allocate_free_reuses_blocks_in_lifo_order():
    pool = BlockPool(4)
    a = pool.allocate(2)
    assert a == [0, 1] and pool.num_free == 2
    pool.free(a)
    assert pool.num_free == 4
    assert pool.allocate(1) == [0]  # the first block of the freed sequence comes back first


def test_reference_counts_keep_shared_blocks_alive():
    pool = BlockPool(3)
    blocks = pool.allocate(2)
    pool.incref(blocks)
    pool.free(blocks)
    assert pool.num_free == 1 and pool.ref_counts[blocks[0]] == 1
    pool.free(blocks)
    assert pool.num_free == 3


def test_over_allocation_and_double_free_are_errors():
    pool = BlockPool(2)
    with pytest.raises(RuntimeError):
        pool.allocate(3)
    b = pool.allocate(1)
    pool.free(b)
    with pytest.raises(AssertionError):
        pool.free(b)
    with pytest.raises(ValueError):
        BlockPool(0)


def test_allocate_slots_grows_by_whole_blocks():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    seq = Sequence("r", list(range(6)), SamplingParams())
    assert kv.allocate_slots(seq, 6) and len(seq.block_ids) == 2
    seq.num_computed_tokens = 6
    assert kv.blocks_needed(seq, 2) == 0  # tokens 6 and 7 still fit in block 1
    assert kv.allocate_slots(seq, 3) and len(seq.block_ids) == 3
    seq.num_computed_tokens = 9
    assert not kv.allocate_slots(seq, 8)  # would need 5 blocks in all
    assert len(seq.block_ids) == 3  # a failed allocation changes nothing
    kv.free(seq)
    assert seq.block_ids == [] and kv.pool.num_free == 4


def test_fork_shares_blocks_and_copies_the_partial_block_on_write():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    parent = Sequence("r", list(range(6)), SamplingParams())
    assert kv.allocate_slots(parent, 6)
    parent.num_computed_tokens = 6  # blocks: [full 0..3 | 4, 5, _, _]
    child = parent.fork()
    kv.fork(parent, child)
    assert child.block_ids == parent.block_ids and kv.pool.ref_counts[parent.block_ids[0]] == 2
    assert kv.pool.total_allocated == 2  # the fork allocated nothing
    full, partial = parent.block_ids
    for seq in (parent, child):
        seq.token_ids.append(9)
    assert kv.allocate_slots(child, 1)  # writes slot 6 of the shared partial block: copy on write
    assert child.block_ids[0] == full and child.block_ids[1] != partial
    assert kv.take_copies() == [(partial, child.block_ids[1])]
    assert kv.allocate_slots(parent, 1)  # now the only holder: writes in place
    assert parent.block_ids == [full, partial] and kv.take_copies() == []
    assert kv.pool.ref_counts[full] == 2 and kv.pool.ref_counts[partial] == 1
    kv.free(parent)
    kv.free(child)
    assert kv.pool.num_free == 8


def test_copy_on_write_needs_a_free_block_and_a_freed_copy_is_dropped():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    parent = Sequence("r", [1, 2], SamplingParams())
    assert kv.allocate_slots(parent, 2)
    parent.num_computed_tokens = 2
    child = parent.fork()
    kv.fork(parent, child)
    child.token_ids.append(3)
    assert kv.allocate_slots(child, 1) and kv.pool.num_free == 0
    other = parent.fork()
    kv.fork(parent, other)
    other.token_ids.append(3)
    assert not kv.allocate_slots(other, 1)  # no block for its copy: nothing changes
    assert other.block_ids == parent.block_ids
    kv.free(child)  # the pending copy into child's block has no reader any more
    assert kv.take_copies() == []
