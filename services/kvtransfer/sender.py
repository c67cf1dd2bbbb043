"""Streams one request's KV to its decode worker while the prefill forward is still running.

The forward thread hands each layer's K/V over as soon as the layer is computed
(`put_layer`, thread-safe); the event loop turns layers into wire chunks and feeds them to an
open client-streaming PushKV call. So by the time the last layer is done, all the others are
already on their way, and the hand-off costs little more than the last layer's bytes.
"""

from __future__ import annotations

import asyncio
import time

import torch

from common.kv import wire
from common.kv.wire import ChunkBuilder, KVLayout
from common.pb import worker_pb2_grpc
from services.worker import metrics

_END = object()


class KVSender:
    def __init__(self, loop: asyncio.AbstractEventLoop, stub: worker_pb2_grpc.WorkerStub, request_id: str,
                 num_tokens: int, layout: KVLayout, timeout: float, min_bytes: int, max_bytes: int) -> None:
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._builder = ChunkBuilder(layout, num_tokens, min_bytes, max_bytes)
        self._begin = wire.begin_message(request_id, num_tokens, layout)
        self.done_at: float | None = None
        self.call = stub.PushKV(self._messages(), timeout=timeout)

    def put_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """From the forward thread: k, v are this request's [kv_heads, tokens, head_dim] of `layer`."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (layer, k, v))

    def finish(self, first_token_id: int) -> None:
        self._queue.put_nowait((_END, first_token_id))

    def cancel(self) -> None:
        self.call.cancel()

    async def wait(self) -> int:
        """Wait until the decode worker acknowledged the whole transfer; return its byte count."""
        reply = await self.call
        self.done_at = time.perf_counter()
        return reply.bytes_received

    async def _messages(self):
        yield self._begin
        while True:
            layer, *rest = await self._queue.get()
            if layer is _END:
                for chunk in self._builder.flush():
                    yield self._chunk(chunk)
                yield wire.end_message(rest[0])
                return
            k, v = rest
            kv = torch.stack([k, v]).transpose(1, 2)  # [2, tokens, heads, head_dim]
            for chunk in self._builder.add_layer(layer, kv):
                yield self._chunk(chunk)

    def _chunk(self, chunk: wire.KVChunk):
        message = wire.chunk_message(chunk)
        metrics.KV_TRANSFER_BYTES.labels("sent").inc(len(message.chunk.data))
        return message
