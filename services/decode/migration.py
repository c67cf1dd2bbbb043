"""Live migration of a running decode request to another decode worker, without recompute: the
async driver of the protocol in services/decode/migration_plan.py.

    pre-copy   read positions [0, n1) out of the pool (n1 = KV written so far) and push them
               while the request keeps decoding here
    pause      take it out of the batch after its current step (its tokens so far are sent)
    tail       push positions [n1, n2) written meanwhile, then `end` with the tokens so far
    hand over  the receiver has adopted it and decodes on; our stream ends with `moved`, the
               gateway attaches to the new worker's stream, and the blocks here are freed

A move that fails after the pause resumes the request here (it lost one pause, nothing else);
a target with no room refuses on `begin` and the next one is tried. The same PushKV path and
wire format carry it as a prefill hand-off (services/kvtransfer).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import grpc

from common.convert import sampling_to_pb
from common.errors import FailedPrecondition, Refused, ResourceExhausted, ServiceError
from common.kv.block_pool import kv_tokens_for
from common.pb import worker_pb2, worker_pb2_grpc
from common.rpc.channels import ChannelPool
from common.rpc.errors import domain_error
from services.decode.engine import DecodeEngine
from services.decode.migration_plan import MovePlan, Pause, Send, targets_in_order
from services.decode.scheduler import DecodeSeq
from services.engine import metrics
from services.kvtransfer import transports, wire
from services.kvtransfer.reader import chunk_ranges, read_kv
from services.kvtransfer.sender import KVSender

log = logging.getLogger(__name__)
READ_BATCH = 2  # wire chunks read ahead of gRPC per migrating request


@dataclass
class Target:
    worker_id: str
    address: str
    free_blocks: int


@dataclass
class MoveResult:
    request_id: str
    moved_to: str | None = None  # worker id; None: still here (no room anywhere) or ended here
    ended_here: bool = False  # finished or cancelled during the move
    bytes: int = 0
    seconds: float = 0.0
    pause_seconds: float = 0.0  # out of the batch: from the pause to the hand-over
    transport: str = ""  # how the KV went: nixl, shm or grpc
    error: str = ""


class Migrator:
    def __init__(self, engine: DecodeEngine, worker_id: str, channels: ChannelPool, kv_executor: Executor,
                 chunk_max_bytes: int, timeout_s: float, local: transports.LocalKV | None = None,
                 transport: str = "auto", peers: transports.PeerBook | None = None) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.channels = channels
        self.kv_executor = kv_executor
        self.chunk_max_bytes = chunk_max_bytes
        self.timeout_s = timeout_s
        # Transports whose targets read the KV out of our pool themselves (services/kvtransfer/
        # transports): a target that cannot refuses on `begin` (FAILED_PRECONDITION, before it
        # reserves anything); the next transport is then tried (auto: nixl, shm, grpc; a named
        # one: it, then grpc, the bytes in PushKV chunks, which every worker takes) and the
        # refusal remembered for that target.
        self.local = local or transports.LocalKV()  # what of our pool peers may read (nothing: grpc)
        self.transport = transport
        self.peers = peers or transports.PeerBook()  # what each target refused (the worker's one book)

    def transports_for(self, address: str) -> list[transports.Transport]:
        """The transports to try for a target, best first."""
        return self.peers.to_try(address, self.transport, self.local)

    async def migrate(self, seq: DecodeSeq, targets: list[Target]) -> MoveResult:
        """Move `seq` to the first target that takes it (targets in order of preference)."""
        result = MoveResult(seq.request_id)
        started = time.perf_counter()
        errors = []
        blocks = self.engine.scheduler.pool.blocks_for(kv_tokens_for(seq.prompt_len, seq.params.max_tokens))
        for target in targets_in_order(targets, blocks, lambda t: t.free_blocks, lambda t: t.worker_id):
            try:
                try:
                    await self._move(seq, target, result)
                except ServiceError as exc:
                    # A failure with nothing moved (a connection reset, say): the request, resumed
                    # here, gets one more try on the same target before it counts as stuck. (The
                    # INTERNAL "Internal error from Core" that used to land here was a refusal
                    # hidden by grpc.aio, grpc/grpc#36066: KVSender now waits for the target to take
                    # `begin` before it writes more, so a refusal arrives as itself.)
                    if not self._transient(exc, seq, result):
                        raise
                    log.warning("moving %s to %s failed (%s): trying once more", seq.request_id,
                                target.worker_id, exc)
                    await self._move(seq, target, result)
                target.free_blocks -= blocks
                break
            except ServiceError as exc:
                errors.append(f"{target.worker_id}: {exc}")
                if not isinstance(exc, Refused | ResourceExhausted):  # no room there is no failure
                    log.warning("moving %s to %s failed: %s", seq.request_id, target.worker_id, exc)
            if result.ended_here:
                break
        else:
            result.error = "; ".join(errors) or "no decode worker has room"
        result.seconds = time.perf_counter() - started
        log.info("request %s: %s in %.1f ms (%d bytes, paused %.1f ms)%s", seq.request_id,
                 f"moved to {result.moved_to}" if result.moved_to else ("ended here" if result.ended_here
                                                                      else "not moved"),
                 result.seconds * 1e3, result.bytes, result.pause_seconds * 1e3,
                 f": {result.error}" if result.error else "")
        if result.moved_to:
            metrics.KV_MIGRATION_SECONDS.observe(result.seconds)
            metrics.KV_MIGRATED_BYTES.inc(result.bytes)
        return result

    async def _push(self, sender: KVSender, seq: DecodeSeq, start: int, end: int, shared: bool) -> None:
        """Positions [start, end) to the target. Shared: a notice that they are final in our pool
        (the target copies them). Otherwise the bytes, read a few chunks at a time, each batch only
        once gRPC has taken the one before: a migration thus holds a few MB, not a request's whole
        KV, and freed buffers are reused at once, where fresh ones would fault their pages in (~3
        ms/MB on these machines, more than the copy itself)."""
        if end <= start:
            return
        if shared:
            sender.put_messages([worker_pb2.KVPush(ready=worker_pb2.KVPush.Ready(token_start=start, token_end=end))])
            await sender.sent()
            return
        ranges = chunk_ranges(self.engine.runner.store.layout, start, end, self.chunk_max_bytes)
        for i in range(0, len(ranges), READ_BATCH):
            if not self._alive(seq):
                # It ended here while the last batch went out (its blocks are freed, its block
                # table empty): stop reading; the caller sees it ended (chaos runs hit this as an
                # IndexError from an empty block table).
                return
            sender.put_messages(await read_kv(self.engine.runner.store, seq.block_table, ranges[i:i + READ_BATCH],
                                              self.kv_executor))
            await sender.sent()

    def _transient(self, exc: ServiceError, seq: DecodeSeq, result: MoveResult) -> bool:
        """A failure worth one more try: not a refusal, nothing moved yet, the request still here."""
        return (not isinstance(exc, Refused | ResourceExhausted | FailedPrecondition) and not result.bytes
                and not result.ended_here and self._alive(seq))

    def _alive(self, seq: DecodeSeq) -> bool:
        return self.engine.scheduler.seqs.get(seq.request_id) is seq

    async def _move(self, seq: DecodeSeq, target: Target, result: MoveResult) -> None:
        order = self.transports_for(target.address)
        for i, via in enumerate(order):
            try:
                await self._move_via(seq, target, result, via)
                return
            except FailedPrecondition as exc:  # refused on `begin`, before the target reserved anything
                if not via.reads_pool or i + 1 == len(order) or not self._alive(seq):
                    raise
                log.info("%s does not take KV by %s from this worker (%s): trying %s", target.worker_id, via.name,
                         exc, order[i + 1].name)
                self.peers.refused(target.address, via.name)

    async def _move_via(self, seq: DecodeSeq, target: Target, result: MoveResult, via: transports.Transport) -> None:
        layout = self.engine.runner.store.layout
        begin = wire.begin_message(seq.request_id, kv_tokens_for(seq.prompt_len, seq.params.max_tokens), layout)
        begin.begin.adopt.CopyFrom(worker_pb2.KVPush.Adopt(
            prompt_len=seq.prompt_len, sampling=sampling_to_pb(seq.params), source_worker_id=self.worker_id))
        stub = worker_pb2_grpc.WorkerStub(self.channels.get(target.address))
        if not via.reads_pool:
            await self._run_move(seq, target, result, via, begin, stub)
            return
        # The target reads our pool: where it is, and where the blocks are in it.
        begin.begin.shared.CopyFrom(via.source(self.local, self.engine.runner.store.pool_blocks(seq.block_table)))
        async with via.while_read(self.local):
            await self._run_move(seq, target, result, via, begin, stub)

    async def _run_move(self, seq: DecodeSeq, target: Target, result: MoveResult, via: transports.Transport,
                        begin: worker_pb2.KVPush, stub: worker_pb2_grpc.WorkerStub) -> None:
        engine, layout = self.engine, self.engine.runner.store.layout
        shared = via.reads_pool  # the target reads our pool: `ready` notices instead of bytes
        sender = KVSender(asyncio.get_running_loop(), stub, begin, layout, self.timeout_s, 1, self.chunk_max_bytes)
        plan, paused, paused_at = MovePlan(), False, 0.0
        try:
            while True:  # the protocol's steps (services/decode/migration_plan.py)
                if not self._alive(seq):  # finished or cancelled here meanwhile
                    result.ended_here = True
                    sender.cancel()
                    return
                step = plan.next(seq.next_position)
                if isinstance(step, Send):
                    await self._push(sender, seq, step.start, step.end, shared)
                elif isinstance(step, Pause):
                    if await engine.pause(seq.request_id) is None:  # it ended during its last step
                        result.ended_here = True
                        sender.cancel()
                        return
                    plan.on_paused()
                    paused, paused_at = True, time.perf_counter()
                else:
                    await self._push(sender, seq, step.start, step.end, shared)
                    if self._alive(seq):
                        break
            sender.finish_with(worker_pb2.KVPush(end=worker_pb2.KVPush.End(tokens=seq.tokens, kv_tokens=step.end)))
            result.bytes = await sender.wait_raw()
            engine.moved(seq, target.worker_id, target.address)
            result.moved_to = target.worker_id
            result.transport = via.name
            result.pause_seconds = time.perf_counter() - paused_at
            paused = False
        except grpc.aio.AioRpcError as exc:
            raise domain_error(exc, f"moving request {seq.request_id} to {target.worker_id}") from None
        finally:
            if paused:  # the move failed after the pause: decode goes on here
                sender.cancel()
                engine.resume(seq)
