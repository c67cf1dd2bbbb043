"""A prefill hand-off that the decode worker reads, layer by layer (a transport that
`stages_hand_offs`: nixl, services/kvtransfer/transports/nixl.py).

The prefill worker holds a KV pool like every worker (it may decode tomorrow), registered with its
NIXL agent. A prompt's hand-off borrows blocks of that pool (`Staging`): each layer's K/V is
written into them by the forward thread as soon as the layer is computed, and a `ready` notice
for that layer goes down the PushKV stream; the decode worker reads those positions into its
own reserved blocks with a NIXL READ (services/kvtransfer/receiver.py) and checks completeness
at `end`, as for bytes. The blocks go back when the push ends, however it ends (the call's done
callback): the receiver reads, never writes, them, so a read that is late reads for a request that
failed (its reservation is failing), and a layer the forward thread has not written by then is
not written at all (`put_layer` and the give-back take one lock).

No staging blocks free (the pool is busy decoding): the hand-off goes as bytes over gRPC. A decode
worker that refuses to read us (FAILED_PRECONDITION on `begin`, before it takes anything), or
whose read of us failed, fails this hand-off (the gateway replays the request) and gets bytes
from this worker from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable

import grpc
import torch

from common.kv.block_pool import BlockPool, OutOfBlocks
from common.pb import worker_pb2
from services.engine import metrics
from services.kvtransfer import wire
from services.kvtransfer.sender import KVSender
from services.kvtransfer.transports import LocalKV, Transport


class Staging:
    """The pool a prefill hand-off stages its KV in, and the transport its receiver reads it by."""

    def __init__(self, local: LocalKV, pool: BlockPool, transport: Transport) -> None:
        self.local = local
        self.store = local.store  # PagedKVStore, readable by `transport`
        self.pool = pool  # the worker's BlockPool (its decode scheduler's): blocks are borrowed from it
        self.transport = transport

    def borrow(self, num_tokens: int) -> list[int] | None:
        try:
            return self.pool.allocate(self.pool.blocks_for(num_tokens))
        except OutOfBlocks:
            return None


class StagedSender:
    def __init__(self, loop: asyncio.AbstractEventLoop, staging: Staging, blocks: list[int], num_tokens: int,
                 on_refused: Callable[[], None]) -> None:
        self._loop = loop
        self._sender: KVSender | None = None
        self._staging = staging
        self._blocks: list[int] | None = blocks
        self._num_tokens = num_tokens
        self._slots = staging.store.slots(blocks, 0, num_tokens)
        self._on_refused = on_refused
        # The forward thread writes the blocks, the loop gives them back: never both at once (a
        # caller that goes away mid-forward cancels the push while layers are still written).
        self._lock = threading.Lock()
        self._progress_held = False

    @classmethod
    def open(cls, loop: asyncio.AbstractEventLoop, stub, request_id: str, num_tokens: int, timeout: float,
             address: str, *, staging: Staging, on_refused: Callable[[str], None]) -> StagedSender | None:
        """None when no staging blocks are free. `on_refused(address)`: that worker refused to
        read us, or its read failed (`_note_refusal`); later hand-offs to it should send bytes."""
        blocks = staging.borrow(num_tokens)
        if blocks is None:
            return None
        staged = cls(loop, staging, blocks, num_tokens, lambda: on_refused(address))
        try:
            begin = wire.begin_message(request_id, num_tokens, staging.store.layout)
            begin.begin.shared.CopyFrom(staging.transport.source(staging.local, staging.store.pool_blocks(blocks)))
            staged._sender = KVSender(loop, stub, begin, staging.store.layout, timeout, 1, 1, address)
            staging.transport.hold(staging.local)  # the receiver reads from us until the call ends
            staged._progress_held = True
            staged._sender.call.add_done_callback(staged._ended)
        except BaseException:
            if staged._sender is not None:
                staged._sender.cancel()
            staged._give_back()
            raise
        return staged

    @property
    def done_at(self) -> float | None:
        return self._sender.done_at

    def put_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """From the forward thread: k, v are this request's [kv_heads, tokens, head_dim] of `layer`."""
        store = self._staging.store
        with self._lock:
            if self._blocks is None:  # the push ended (cancelled): the blocks are someone else's now
                return
            if store.kv.is_cuda and self._slots.device != store.kv.device:
                self._slots = self._slots.to(store.kv.device)
            store.write_tokens(layer, self._slots, k.transpose(0, 1), v.transpose(0, 1))
            if store.kv.is_cuda:
                torch.cuda.current_stream(store.kv.device).synchronize()  # in the pool before anyone reads it
        ready = worker_pb2.KVPush(ready=worker_pb2.KVPush.Ready(token_start=0, token_end=self._num_tokens,
                                                                layer_start=layer, layer_end=layer + 1))
        self._loop.call_soon_threadsafe(self._sender.put_messages, [ready])
        metrics.KV_TRANSFER_BYTES.labels("sent", self._staging.transport.name).inc(
            self._num_tokens * store.layout.bytes_per_token_layer)

    def finish(self, first_token_id: int) -> None:
        self._sender.finish(first_token_id)

    def cancel(self) -> None:
        self._sender.cancel()

    async def wait(self) -> int:
        return await self._sender.wait()

    def _ended(self, call) -> None:
        self._give_back()
        if not call.cancelled():
            self._loop.create_task(self._note_refusal(call))

    async def _note_refusal(self, call) -> None:
        """The receiver refused to read us on `begin`, or a read of us failed there: this pair
        does not work by this transport (say, NIXL agents that load but cannot connect)."""
        with contextlib.suppress(Exception):
            code = await call.code()
            if code == grpc.StatusCode.FAILED_PRECONDITION or (
                    code == grpc.StatusCode.UNAVAILABLE and self._staging.transport.read_failed
                    and self._staging.transport.read_failed in (await call.details() or "")):
                self._on_refused()

    def _give_back(self) -> None:
        with self._lock:
            blocks, self._blocks = self._blocks, None
        if blocks is None:
            return
        self._staging.pool.free(blocks)
        if self._progress_held:
            self._progress_held = False
            self._staging.transport.release(self._staging.local)
