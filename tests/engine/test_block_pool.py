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
    seq = Sequence("r", None, list(range(6)), SamplingParams())
    assert kv.allocate_slots(seq, 6) and len(seq.block_ids) == 2
    seq.num_computed_tokens = 6
    assert kv.blocks_needed(seq, 2) == 0  # tokens 6 and 7 still fit in block 1
    assert kv.allocate_slots(seq, 3) and len(seq.block_ids) == 3
    seq.num_computed_tokens = 9
    assert not kv.allocate_slots(seq, 8)  # would need 5 blocks in all
    assert len(seq.block_ids) == 3  # a failed allocation changes nothing
    kv.free(seq)
    assert seq.block_ids == [] and kv.pool.num_free == 4
