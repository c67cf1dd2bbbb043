"""The shm KV transport's pieces: a pool in a memfd that a peer maps, and the copy out of it."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from common.kv.kv_store import PagedKVStore, slots_for
from common.kv.layout import KVLayout
from common.kv.shared_memory import SharedPoolHandle, host_id
from services.kvtransfer.peer_pools import PeerPools

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, dtype=torch.float32)


def test_a_peer_copies_a_requests_kv_out_of_a_shared_pool():
    source = PagedKVStore(LAYOUT, num_blocks=8, block_size=4, device=torch.device("cpu"), shared=True)
    target = PagedKVStore(LAYOUT, num_blocks=8, block_size=4, device=torch.device("cpu"))
    assert source.shared_handle is not None and target.shared_handle is None
    assert not source.kv.any() and not target.kv.any()  # zeroed up front
    source.kv.copy_(torch.randn_like(source.kv))

    handle = SharedPoolHandle.from_pb(source.shared_handle.to_pb())
    mapped = PeerPools().open(handle)
    assert torch.equal(mapped, source.kv)  # the same memory, seen through /proc/<pid>/fd
    src_table, dst_table = [5, 2, 7], [0, 3, 1]
    copied = target.copy_from_peer(mapped, slots_for(src_table, 1, 10, 4), target.slots(dst_table, 1, 10))
    assert copied == LAYOUT.bytes_for(9)
    for layer in range(LAYOUT.num_layers):
        src = source.read_chunk(layer, layer + 1, source.slots(src_table, 1, 10))
        dst = target.read_chunk(layer, layer + 1, target.slots(dst_table, 1, 10))
        assert torch.equal(src, dst)
    untouched = target.read_chunk(0, LAYOUT.num_layers, target.slots(dst_table, 0, 1))
    assert not untouched.any()  # position 0 was not asked for


def test_a_pool_on_another_host_or_of_another_shape_is_not_mapped():
    source = PagedKVStore(LAYOUT, num_blocks=4, block_size=4, device=torch.device("cpu"), shared=True)
    elsewhere = dataclasses.replace(source.shared_handle, host_id="another-boot", pool_id="x")
    with pytest.raises(OSError, match="another host"):
        PeerPools().open(elsewhere)
    wrong_shape = dataclasses.replace(source.shared_handle, shape=(2, 3, 9, 4, 2, 4))
    with pytest.raises(OSError, match="not a KV pool"):
        PeerPools().open(wrong_shape)


def test_the_pid_namespace_and_the_pool_id_are_checked():
    """Two containers on one node share the boot id; in each the worker may be pid 1. A handle
    from another pid namespace is another host's, and a pid/fd that now holds another pool (or
    none of ours) is refused, never mapped."""
    assert host_id().endswith(os.readlink("/proc/self/ns/pid"))
    source = PagedKVStore(LAYOUT, num_blocks=4, block_size=4, device=torch.device("cpu"), shared=True)
    boot = host_id().split("/", 1)[0]
    other_namespace = dataclasses.replace(source.shared_handle, host_id=f"{boot}/pid:[1]", pool_id="z")
    with pytest.raises(OSError, match="another host"):
        PeerPools().open(other_namespace)
    another_pool = dataclasses.replace(source.shared_handle, pool_id="0" * 32)
    with pytest.raises(OSError, match="is not the KV pool"):
        PeerPools().open(another_pool)
