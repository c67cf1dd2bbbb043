"""The sim engine's scratch pool (common/modeling/sim_runner.py): many blocks folded onto a few
real ones, so that NIXL moves a simulated model's real bytes between small registered pools."""

from __future__ import annotations

import torch

from common.kv.layout import KVLayout
from common.modeling.registry import RunnerSpec, build_runner
from common.modeling.sim_runner import NullKVStore, ScratchKVStore
from services.kvtransfer import nixl_agent
from services.kvtransfer.nixl_agent import read_descriptors
from tests.unit.test_nixl_agent import apply

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.float32)
BLOCK = 4
BLOCK_BYTES = LAYOUT.bytes_for(BLOCK)


def test_blocks_fold_onto_the_scratch_and_slots_follow():
    store = ScratchKVStore(LAYOUT, num_blocks=100, block_size=BLOCK, scratch_bytes=5 * BLOCK_BYTES)
    assert store.num_blocks == 5 and store.kv.shape == (2, 3, 6, BLOCK, 2, 8)
    assert store.pool_blocks([0, 4, 5, 99]) == [0, 4, 0, 4]
    assert store.slots([7], 0, BLOCK).tolist() == [8, 9, 10, 11]  # block 7 is real block 2
    small = ScratchKVStore(LAYOUT, num_blocks=3, block_size=BLOCK, scratch_bytes=5 * BLOCK_BYTES)
    assert small.num_blocks == 3  # never more than the worker's blocks


def test_a_read_between_folded_pools_moves_every_byte_inside_them():
    src = ScratchKVStore(LAYOUT, num_blocks=64, block_size=BLOCK, scratch_bytes=3 * BLOCK_BYTES)
    dst = ScratchKVStore(LAYOUT, num_blocks=64, block_size=BLOCK, scratch_bytes=5 * BLOCK_BYTES)
    src.kv.copy_(torch.randn(src.kv.shape))
    src_table, dst_table = [10, 11, 12, 13], [40, 41, 42, 43]  # real blocks [1, 2, 0, 1] and [0, 1, 2, 3]
    remote, local = read_descriptors(src.kv.data_ptr(), tuple(src.kv.shape), src.pool_blocks(src_table),
                                     dst.kv.data_ptr(), tuple(dst.kv.shape), dst.pool_blocks(dst_table),
                                     4, 0, 16, 0, 3)
    for rows, pool in ((remote, src.kv), (local, dst.kv)):  # no row leaves its pool
        assert rows[:, 0].min() >= pool.data_ptr()
        assert (rows[:, 0] + rows[:, 1]).max() <= pool.data_ptr() + pool.nbytes
    assert int(local[:, 1].sum()) == LAYOUT.bytes_for(16)  # the real size of 16 positions
    apply((remote, local), src.kv, dst.kv)
    for i, (s, d) in enumerate(zip(src.pool_blocks(src_table), dst.pool_blocks(dst_table), strict=True)):
        assert torch.equal(dst.kv[:, :, d], src.kv[:, :, s]), i


def test_a_sim_worker_keeps_bytes_only_where_nixl_may_read_them():
    spec = RunnerSpec(model="sim:llama3-8b-h100", kv_blocks=8192)
    assert isinstance(build_runner(spec).runner.store, NullKVStore)
    nixl = build_runner(RunnerSpec(model="sim:llama3-8b-h100", kv_blocks=8192, nixl_kv=True)).runner.store
    if nixl_agent.available():
        assert isinstance(nixl, ScratchKVStore) and nixl.kv.nbytes <= 70 << 20  # 32 blocks of 2 MiB, and null
    else:
        assert isinstance(nixl, NullKVStore)
