"""common/kv/device_copy.py: on a CPU nothing is copied and nothing changes threads; on CUDA (run
where there is one) KV goes to the host through pinned buffers on side streams, and into a pool
through pinned staging, and the bytes arrive equal."""

from __future__ import annotations

import threading

import pytest
import torch

from common.kv import device_copy
from common.kv.kv_store import PagedKVStore
from common.kv.layout import KVLayout
from common.modeling.sim_runner import NullKVStore

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, dtype=torch.float32)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


async def test_host_tensors_are_not_copied():
    t = torch.arange(12.0).view(3, 4)
    pending = device_copy.start_to_host(t)
    assert pending.tensor is t and pending.event is None
    assert await pending.ready() is t and pending.wait() is t
    assert device_copy.to_host(t) is t
    assert device_copy.to_device(t, torch.device("cpu")) is t


def test_cpu_work_runs_inline_on_the_calling_thread():
    seen = []
    result = device_copy.on_side_stream(torch.device("cpu"), lambda x: seen.append(threading.get_ident()) or x, 7)
    assert result == 7 and seen == [threading.get_ident()]


def test_pool_device():
    assert device_copy.pool_device(PagedKVStore(LAYOUT, 2, 4, torch.device("cpu"))) == torch.device("cpu")
    assert device_copy.pool_device(NullKVStore(LAYOUT, 2, 4)) == torch.device("cpu")  # no bytes kept


def test_cpu_pool_write_and_read_round_trip():
    store = PagedKVStore(LAYOUT, 4, 4, torch.device("cpu"))
    kv = torch.randn(LAYOUT.num_layers, 2, 6, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    slots = store.slots([2, 0], 0, 6)
    device_copy.on_side_stream(torch.device("cpu"), store.write_chunk, 0, slots, kv)
    assert torch.equal(store.read_chunk(0, LAYOUT.num_layers, slots), kv)


@cuda
async def test_cuda_to_host_is_pinned_and_equal():
    src = torch.randn(2, 300, 2, 16, device="cuda")
    pending = device_copy.start_to_host(src * 2)  # a temporary: its memory is kept for the side stream
    assert pending.event is not None and pending.tensor.is_pinned()
    assert torch.equal(await pending.ready(), (src * 2).cpu())
    assert torch.equal(device_copy.to_host(src), src.cpu())


@cuda
def test_cuda_pool_write_through_pinned_staging():
    store = PagedKVStore(LAYOUT, 4, 4, torch.device("cuda"))
    kv = torch.randn(LAYOUT.num_layers, 2, 6, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    slots = store.slots([3, 1], 0, 6)
    device_copy.on_side_stream(torch.device("cuda"), store.write_chunk, 0, slots, kv)
    back = device_copy.on_side_stream(torch.device("cuda"),
                                      lambda: device_copy.to_host(store.read_chunk(0, LAYOUT.num_layers, slots)),
                                      purpose="out")
    assert torch.equal(back, kv)
    assert device_copy.side_stream("cuda", "in") is device_copy.side_stream(torch.device("cuda", 0), "in")
    assert device_copy.side_stream("cuda", "in") is not device_copy.side_stream("cuda", "out")
