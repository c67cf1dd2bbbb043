"""Reading a running request's KV back out of a worker's pool as wire messages, for migration.

Reads run on a thread of their own (never the event loop's, never the model's): on a GPU the
device-to-host copy blocks its thread, and the model thread is busy with decode steps, which go
on while a migration pre-copies. On a GPU the gathers and the copies into pinned host memory run
on a side stream (common/kv/device_copy.py), not behind the decode steps on the compute stream.
Positions whose KV is already written never change (and their writes are done: the steps that
wrote them have returned their tokens), so reading them while the model writes later positions
is safe.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor

from common.kv import device_copy
from common.kv.layout import KVLayout
from common.modeling.base import KVStore
from common.pb import worker_pb2
from services.kvtransfer import wire
from services.kvtransfer.wire import KVChunk

ChunkRange = tuple[int, int, int, int]  # (layer_start, layer_end, token_start, token_end)


def chunk_ranges(layout: KVLayout, token_start: int, token_end: int, max_bytes: int) -> list[ChunkRange]:
    """(layer_start, layer_end, token_start, token_end) pieces covering the range, each at most
    `max_bytes` (at least one token of one layer): whole layer groups when a layer's slice fits,
    otherwise one layer split by tokens."""
    if token_end <= token_start:
        return []
    per_layer = (token_end - token_start) * layout.bytes_per_token_layer
    if per_layer <= max_bytes:
        step = max(1, max_bytes // per_layer)
        return [(lo, min(lo + step, layout.num_layers), token_start, token_end)
                for lo in range(0, layout.num_layers, step)]
    tokens = max(1, max_bytes // layout.bytes_per_token_layer)
    return [(layer, layer + 1, t, min(t + tokens, token_end))
            for layer in range(layout.num_layers) for t in range(token_start, token_end, tokens)]


def read_messages(store: KVStore, block_table: list[int], ranges: list[ChunkRange]) -> list[worker_pb2.KVPush]:
    """Blocking: the KV of a request at these `chunk_ranges` pieces, as PushKV chunk messages."""
    return device_copy.on_side_stream(device_copy.pool_device(store), _read, store, block_table, ranges,
                                      purpose="out")


def _read(store: KVStore, block_table: list[int], ranges: list[ChunkRange]) -> list[worker_pb2.KVPush]:
    out = []
    for layer_start, layer_end, t0, t1 in ranges:
        kv = device_copy.to_host(store.read_chunk(layer_start, layer_end, store.slots(block_table, t0, t1)))
        out.append(wire.chunk_message(KVChunk(layer_start, layer_end, t0, t1, kv)))
    return out


async def read_kv(store: KVStore, block_table: list[int], ranges: list[ChunkRange],
                  executor: Executor) -> list[worker_pb2.KVPush]:
    return await asyncio.get_running_loop().run_in_executor(
        executor, read_messages, store, list(block_table), ranges)
