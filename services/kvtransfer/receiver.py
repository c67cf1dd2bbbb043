"""The receiving side of a PushKV stream: KV written into a decode worker's reserved blocks.

Two kinds of transfer arrive here:
- a prefill hand-off, for a reservation this worker already holds (the gateway opened Decode
  first): `begin` names it, `end` carries the first token;
- a live migration (`begin.adopt` set): the receiver reserves the whole request itself on `begin`
  (RESOURCE_EXHAUSTED if it has no room: the sender tries another worker), and `end` carries the
  completion tokens so far; decode then goes on here, and the gateway attaches to its stream.

Every chunk is checked against the pool's layout and the transfer's ranges, and at `end` every
(layer, position) cell that was promised must have arrived. A transfer that breaks off or fails a
check ends the request it was for (its blocks go back), never one that already has its KV.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from typing import Protocol

import torch

from common.convert import sampling_from_pb
from common.errors import InvalidArgument, ServiceError, Unavailable
from common.kv import device_copy
from common.kv.block_pool import kv_tokens_for
from common.kv.layout import KVLayout
from common.pb import worker_pb2
from services.engine import metrics
from services.kvtransfer import transports, wire
from services.kvtransfer.copying import Reservation, guarded
from services.kvtransfer.transports import SharedReads, Source

# A Reservation is the sink's own (services/decode/scheduler.DecodeSeq for a decode engine): the
# receiver reads its `request_id`, `prompt_len` and `block_table` and hands it back to the sink.


class KVSink(Protocol):
    """What a PushKV stream writes into (services/decode/engine.DecodeEngine is one): the
    receiver depends on this, not on the decode engine."""

    @property
    def store(self): ...  # the pool a peer's pages are read into (shm, NIXL)

    def held(self, request_id: str) -> Reservation | None: ...  # the reservation of that id, if any

    def waiting_for_kv(self, seq: Reservation) -> bool: ...  # still held and still waiting for its KV

    def expect_kv(self, request_id: str, num_tokens: int) -> Reservation: ...

    def adopt(self, request_id: str, prompt_len: int, params) -> Reservation: ...

    def receiving_store(self, seq: Reservation): ...

    def write_kv(self, seq: Reservation, chunk: wire.KVChunk) -> None: ...

    def copying(self, seq: Reservation) -> None: ...

    def copied(self, seq: Reservation) -> None: ...

    def kv_complete(self, request_id: str, first_token: int) -> None: ...

    def kv_complete_migrated(self, request_id: str, tokens: list[int]) -> None: ...

    def fail(self, request_id: str, error: ServiceError) -> None: ...


async def receive_kv(messages: AsyncIterator[worker_pb2.KVPush], engine: KVSink, layout: KVLayout,
                     vocab_size: int, may_adopt: bool, shared: SharedReads | None = None,
                     io_executor: Executor | None = None,
                     accepted: Callable[[], Awaitable[None]] | None = None) -> int:
    """Consume one PushKV stream; return the bytes received. Raises a domain error on a bad or
    broken transfer, after failing the request it was for. Chunks into a GPU pool are written on
    `io_executor` (None: asyncio's default), never on the loop's thread. `accepted` is awaited
    once `begin` is taken (the server sends its initial metadata then: the sender writes nothing
    more before it, services/kvtransfer/sender.py)."""
    first = await anext(aiter(messages), None)
    if first is None or first.WhichOneof("part") != "begin":
        raise InvalidArgument("a KV push must start with a begin message")
    begin = first.begin
    adopting = begin.HasField("adopt")
    # Before anything is reserved: a sender told "cannot map" sends the bytes over gRPC instead.
    source = (transports.for_source(begin.shared).open(begin.shared, shared, engine.store)
              if begin.HasField("shared") else None)
    if adopting:
        num_tokens = _parse_begin(begin, layout)
        seq = _adopt(begin, engine, num_tokens, may_adopt)
    else:
        seq = engine.held(begin.request_id)
        if seq is None:
            raise InvalidArgument(f"KV pushed for unknown request {begin.request_id!r}: no reservation on this worker")
    try:
        if not adopting:
            num_tokens = wire.parse_begin(begin, layout)
            engine.expect_kv(begin.request_id, num_tokens)
        if accepted is not None:
            await accepted()
        written = torch.zeros(layout.num_layers, num_tokens, dtype=torch.bool)
        received = 0
        async for message in messages:
            part = message.WhichOneof("part")
            if part == "chunk":
                chunk = wire.parse_chunk(message.chunk, layout, num_tokens)
                await _write_chunk(engine, seq, chunk, io_executor)
                written[chunk.layer_start:chunk.layer_end, chunk.token_start:chunk.token_end] = True
                received += chunk.kv.nbytes
                metrics.KV_TRANSFER_BYTES.labels("received", "grpc").inc(chunk.kv.nbytes)
            elif part == "ready":
                if source is None:
                    raise wire.WireError("a ready message needs a shared source in begin")
                ready = message.ready
                layers = _ready_layers(ready, layout)
                copied = await _copy_from_source(source, shared, engine, seq, ready.token_start, ready.token_end,
                                                 layers, num_tokens)
                written[layers.start:layers.stop, ready.token_start:ready.token_end] = True
                received += copied
                metrics.KV_TRANSFER_BYTES.labels("received", source.transport.name).inc(copied)
            elif part == "end":
                _complete(message.end, seq, engine, written, vocab_size, adopting)
                return received
            else:
                raise wire.WireError("a KV push has exactly one begin message")
        raise wire.WireError("KV push ended without an end message")
    except asyncio.CancelledError:
        # The sender went away mid-transfer: the KV will not complete.
        _fail_if_waiting(engine, seq, Unavailable(f"KV push for request {begin.request_id!r} broke off"))
        raise
    except (wire.WireError, ServiceError) as exc:
        error = InvalidArgument(str(exc)) if isinstance(exc, wire.WireError) else exc
        _fail_if_waiting(engine, seq, error)
        raise error from None
    except Exception as exc:  # noqa: BLE001 - anything else still fails the reservation: never a leak
        error = ServiceError(f"KV push for request {begin.request_id!r} failed: {type(exc).__name__}: {exc}")
        _fail_if_waiting(engine, seq, error)
        raise error from exc


def _ready_layers(ready: worker_pb2.KVPush.Ready, layout: KVLayout) -> range:
    if ready.layer_start == ready.layer_end == 0:
        return range(layout.num_layers)
    if not 0 <= ready.layer_start < ready.layer_end <= layout.num_layers:
        raise wire.WireError(f"KV ready for layers [{ready.layer_start}, {ready.layer_end}) outside "
                             f"[0, {layout.num_layers})")
    return range(ready.layer_start, ready.layer_end)


async def _write_chunk(engine: KVSink, seq: Reservation, chunk: wire.KVChunk, executor: Executor | None) -> None:
    device = device_copy.pool_device(engine.receiving_store(seq))
    if not device_copy.is_cuda(device):
        engine.write_kv(seq, chunk)  # a CPU pool: inline, one memory copy of at most a chunk
        return
    # A GPU pool: pinned staging and a non_blocking copy on the side stream, on a worker thread.
    await guarded(engine, seq, executor, device_copy.on_side_stream, device, engine.write_kv, seq, chunk)


async def _copy_from_source(source: Source, shared: SharedReads, engine: KVSink, seq: Reservation,
                            start: int, end: int, layers: range, num_tokens: int) -> int:
    if not 0 <= start < end <= min(num_tokens, len(source.block_table) * source.block_size):
        raise wire.WireError(f"KV ready for positions [{start}, {end}) outside the transfer's "
                             f"[0, {min(num_tokens, len(source.block_table) * source.block_size)})")
    return await source.transport.copy(source, shared, engine, seq, start, end, layers)


def _parse_begin(begin: worker_pb2.KVPush.Begin, layout: KVLayout) -> int:
    try:
        return wire.parse_begin(begin, layout)
    except wire.WireError as exc:
        raise InvalidArgument(str(exc)) from None


def _adopt(begin: worker_pb2.KVPush.Begin, engine: KVSink, num_tokens: int, may_adopt: bool) -> Reservation:
    if not may_adopt:
        raise Unavailable("this worker takes no migrated requests now (draining, switching or not decoding)")
    params = sampling_from_pb(begin.adopt.sampling)
    prompt_len = begin.adopt.prompt_len
    if prompt_len < 1 or params.max_tokens < 2:
        raise InvalidArgument(f"a migrated request needs prompt_len >= 1 and max_tokens >= 2, got {prompt_len} "
                              f"and {params.max_tokens}")
    if num_tokens != kv_tokens_for(prompt_len, params.max_tokens):
        raise InvalidArgument(f"a migration's begin must announce the request's whole KV "
                              f"({kv_tokens_for(prompt_len, params.max_tokens)} tokens), got {num_tokens}")
    return engine.adopt(begin.request_id, prompt_len, params)


def _complete(end: worker_pb2.KVPush.End, seq: Reservation, engine: KVSink, written: torch.Tensor,
              vocab_size: int, adopting: bool) -> None:
    if adopting:
        tokens = list(end.tokens)
        kv_tokens = seq.prompt_len + len(tokens) - 1
        if not tokens or end.kv_tokens != kv_tokens:
            raise wire.WireError(f"a migration ends with the tokens so far and prompt_len + len(tokens) - 1 "
                                 f"positions of KV; got {len(tokens)} tokens and {end.kv_tokens} positions")
        cells = written[:, :kv_tokens]
    else:
        tokens = [end.first_token_id]
        cells = written
    if not bool(cells.all()):
        raise wire.WireError(f"KV push ended with {int((~cells).sum())} of {cells.numel()} (layer, token) "
                             f"cells missing")
    if any(not 0 <= t < vocab_size for t in tokens):
        raise wire.WireError("a token of the KV push is outside the vocabulary")
    if adopting:
        engine.kv_complete_migrated(seq.request_id, tokens)
    else:
        engine.kv_complete(seq.request_id, tokens[0])


def _fail_if_waiting(engine: KVSink, seq: Reservation, error: ServiceError) -> None:
    """Fail the reservation this push was for, if it is still that one and still waiting for its
    KV: a stray or duplicate push must not end a request that is already decoding, nor a newer
    request that reuses the id."""
    if engine.waiting_for_kv(seq):
        engine.fail(seq.request_id, error)
