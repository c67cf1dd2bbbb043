import random

import pytest

from common.kv.block_pool import BlockPool, OutOfBlocks
from common.kv.kv_store import slots_for


def test_allocate_and_free_round_trip():
    pool = BlockPool(num_blocks=8, block_size=4)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert len(a) == 3 and len(b) == 5
    assert sorted(a + b) == list(range(8))
    assert (pool.num_free, pool.num_used) == (0, 8)
    pool.free(a)
    assert (pool.num_free, pool.num_used) == (3, 5)
    pool.free(b)
    assert (pool.num_free, pool.num_used) == (8, 0)


def test_allocate_zero_is_empty():
    pool = BlockPool(4, 16)
    assert pool.allocate(0) == []
    assert pool.num_used == 0


def test_out_of_blocks_message_and_no_partial_allocation():
    pool = BlockPool(8, 4)
    pool.allocate(5)
    with pytest.raises(OutOfBlocks, match=r"need 4 KV blocks, 3 of 8 free"):
        pool.allocate(4)
    assert (pool.num_free, pool.num_used) == (3, 5)


def test_double_free_raises():
    pool = BlockPool(4, 4)
    blocks = pool.allocate(2)
    pool.free(blocks)
    with pytest.raises(ValueError, match="not in use"):
        pool.free(blocks[:1])
    assert (pool.num_free, pool.num_used) == (4, 0)


def test_free_of_never_allocated_block_raises():
    pool = BlockPool(4, 4)
    with pytest.raises(ValueError):
        pool.free([0])


@pytest.mark.parametrize("num_blocks, block_size", [(0, 4), (4, 0), (-1, 4)])
def test_rejects_non_positive_sizes(num_blocks, block_size):
    with pytest.raises(ValueError):
        BlockPool(num_blocks, block_size)


@pytest.mark.parametrize("tokens, expected", [(0, 0), (1, 1), (15, 1), (16, 1), (17, 2), (32, 2), (33, 3)])
def test_blocks_for(tokens, expected):
    assert BlockPool(8, 16).blocks_for(tokens) == expected


def test_slots_for():
    table = [7, 2, 5]
    slots = slots_for(table, 0, 12, 4).tolist()
    assert slots[0] == 28 and slots[3] == 31 and slots[4] == 8 and slots[9] == 21
    assert len(set(slots)) == 12
    assert slots_for(table, 3, 6, 4).tolist() == slots[3:6]


def test_invariant_through_random_sequence():
    rng = random.Random(1234)
    pool = BlockPool(num_blocks=64, block_size=8)
    owned: list[list[int]] = []
    for _ in range(2000):
        if owned and rng.random() < 0.45:
            pool.free(owned.pop(rng.randrange(len(owned))))
        else:
            n = rng.randint(0, 12)
            try:
                owned.append(pool.allocate(n))
            except OutOfBlocks:
                assert n > pool.num_free
        assert pool.num_free + pool.num_used == pool.num_blocks
        held = [b for blocks in owned for b in blocks]
        assert len(held) == len(set(held)) == pool.num_used
        assert all(0 <= b < pool.num_blocks for b in held)
    for blocks in owned:
        pool.free(blocks)
    assert (pool.num_free, pool.num_used) == (64, 0)
