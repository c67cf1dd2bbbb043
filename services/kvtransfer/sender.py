"""The sending side of one PushKV stream: `begin`, chunks as they are handed in, `end`.

Two producers feed it:
- prefill: the forward thread hands each layer's K/V over as soon as the layer is computed
  (`put_layer`, thread-safe); the event loop turns layers into wire chunks. By the time the last
  layer is done the others are already on their way, so the hand-off costs little more than the
  last layer's bytes. On a GPU each layer starts for the host in `put_layer`, into a pinned buffer
  on a side stream (common/kv/device_copy.py); the loop waits for that copy off its own thread.
- migration: KV read back out of the pool arrives as ready wire messages (`put_messages`), built
  off the event loop by `services/kvtransfer/reader.py`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

import grpc
import torch

from common.errors import DeadlineExceeded, Unavailable
from common.kv import device_copy
from common.kv.layout import KVLayout
from common.pb import worker_pb2, worker_pb2_grpc
from common.rpc.channels import ChannelPool
from services.engine import metrics
from services.kvtransfer import wire
from services.kvtransfer.wire import ChunkBuilder

_END = object()
# The receiver's initial metadata, sent once it has taken `begin` (services/kvtransfer/receiver.py).
KV_ACCEPTED = (("dopd-kv-accepted", "1"),)


class PrefillSender(Protocol):
    """What the prefill engine needs of a KV stream to a decode worker (KVSender over gRPC; an
    in-process one in tests). `wait` raises DeadlineExceeded or Unavailable on a failed hand-off."""

    done_at: float | None

    def put_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None: ...

    def finish(self, first_token_id: int) -> None: ...

    def cancel(self) -> None: ...

    async def wait(self) -> int: ...


# (decode_address, request_id, num_tokens, timeout) -> an open stream
OpenSender = Callable[[str, str, int, float], PrefillSender]


def grpc_sender_factory(channels: ChannelPool, layout: KVLayout, min_bytes: int, max_bytes: int,
                        staged: Callable[..., PrefillSender | None] | None = None,
                        reads_us: Callable[[str], bool] = lambda address: False) -> OpenSender:
    """Prefill hand-offs over PushKV: the bytes in chunks, or, to a decode worker that
    `reads_us` (it advertised the staging transport, nixl), `staged` ready notices for it to read
    (services/kvtransfer/staged_sender.py; None back: no staging room, the bytes then)."""
    def open_sender(address: str, request_id: str, num_tokens: int, timeout: float) -> PrefillSender:
        loop = asyncio.get_running_loop()
        stub = worker_pb2_grpc.WorkerStub(channels.get(address))
        if staged is not None and reads_us(address):
            sender = staged(loop, stub, request_id, num_tokens, timeout, address)
            if sender is not None:
                return sender
        return KVSender.for_prefill(loop, stub, request_id, num_tokens, layout, timeout, min_bytes, max_bytes,
                                    address)
    return open_sender


class KVSender:
    def __init__(self, loop: asyncio.AbstractEventLoop, stub: worker_pb2_grpc.WorkerStub, begin: worker_pb2.KVPush,
                 layout: KVLayout, timeout: float, min_bytes: int, max_bytes: int, address: str = "") -> None:
        self._loop = loop
        self.address = address
        self._queue: asyncio.Queue = asyncio.Queue()
        self._builder = ChunkBuilder(layout, begin.begin.num_tokens, min_bytes, max_bytes)
        self._begin = begin
        self.done_at: float | None = None
        self.call = stub.PushKV(self._messages(), timeout=timeout)

    @classmethod
    def for_prefill(cls, loop, stub, request_id: str, num_tokens: int, layout: KVLayout, timeout: float,
                    min_bytes: int, max_bytes: int, address: str = "") -> KVSender:
        return cls(loop, stub, wire.begin_message(request_id, num_tokens, layout), layout, timeout, min_bytes,
                   max_bytes, address)

    def put_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """From the forward thread: k, v are this request's [kv_heads, tokens, head_dim] of `layer`."""
        if k.is_cuda:
            # Behind the layer's compute, on a side stream: the forward thread never waits for it.
            item = device_copy.start_to_host(torch.stack([k.transpose(0, 1), v.transpose(0, 1)]))
        else:
            item = (k, v)  # host tensors: stacked on the loop, no copy here
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (layer, item))

    def put_messages(self, messages: list[worker_pb2.KVPush]) -> None:
        """From the loop thread: wire chunks already built."""
        for message in messages:
            self._queue.put_nowait((None, message))

    def finish(self, first_token_id: int) -> None:
        self.finish_with(wire.end_message(first_token_id))

    def finish_with(self, end: worker_pb2.KVPush) -> None:
        self._queue.put_nowait((_END, end))

    def cancel(self) -> None:
        self.call.cancel()

    async def wait(self) -> int:
        """Wait until the receiver acknowledged the whole transfer; return its byte count."""
        try:
            return await self.wait_raw()
        except grpc.aio.AioRpcError as exc:
            # Whatever the receiver said, to our caller it is a failed hand-off, not its input.
            kind = DeadlineExceeded if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else Unavailable
            raise kind(f"KV push to {self.address or 'the decode worker'} failed: "
                       f"{exc.code().name}: {exc.details()}") from None

    async def wait_raw(self) -> int:
        """As wait(), but a failure stays the receiver's own status (migration tells refusals apart)."""
        reply = await self.call
        self.done_at = time.perf_counter()
        return reply.bytes_received

    async def sent(self) -> None:
        """Until gRPC has taken every message handed in so far (a migration pauses its request
        only then, so that the pause covers the tail alone). Returns early when the call ended:
        `wait` then says how."""
        join = asyncio.ensure_future(self._queue.join())
        try:
            while not join.done() and not self.call.done():
                await asyncio.wait({join}, timeout=0.05)
        finally:
            join.cancel()

    async def _messages(self):
        yield self._begin
        # Nothing more until the receiver has taken `begin` (KV_ACCEPTED) or refused it: a write
        # racing a refusal fails, and grpc.aio then reports INTERNAL ("Internal error from Core")
        # in place of the receiver's status (grpc/grpc#36066), which would hide a refusal (no
        # room, or cannot read us) as a failure. One round trip, while the first layer computes.
        metadata = await self.call.initial_metadata()
        if KV_ACCEPTED[0] not in tuple(metadata or ()):
            await self.call.code()  # refused: the call ends before this stream half-closes
            return
        while True:
            layer, item = await self._queue.get()
            try:
                if layer is _END:
                    for chunk in self._builder.flush():
                        yield self._counted(wire.chunk_message(chunk))
                    yield item
                    return
                if layer is None:
                    yield self._counted(item)
                    continue
                if isinstance(item, device_copy.HostCopy):
                    kv = await item.ready()  # [2, tokens, heads, head_dim], pinned
                else:
                    kv = torch.stack(item).transpose(1, 2)  # [2, tokens, heads, head_dim]
                for chunk in self._builder.add_layer(layer, kv):
                    yield self._counted(wire.chunk_message(chunk))
            finally:
                self._queue.task_done()

    def _counted(self, message: worker_pb2.KVPush) -> worker_pb2.KVPush:
        if not message.HasField("chunk"):  # a shm `ready` notice: the receiver counts what it copies
            return message
        # Sized from its ranges: reading `chunk.data` would copy the bytes.
        part, layout = message.chunk, self._builder.layout
        layers, tokens = part.layer_end - part.layer_start, part.token_end - part.token_start
        metrics.KV_TRANSFER_BYTES.labels("sent", "grpc").inc(layers * tokens * layout.bytes_per_token_layer)
        return message
