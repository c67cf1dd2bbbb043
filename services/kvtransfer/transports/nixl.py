"""nixl: the receiver READs the sender's registered pool with NIXL (services/kvtransfer/nixl_agent.py):
one host or several, host or GPU memory. The sender's agent progresses while a push that is read
from it is open (`hold`). A prefill hand-off may stage its KV layer by layer for it
(services/kvtransfer/staged_sender.py)."""

from __future__ import annotations

from common.errors import FailedPrecondition, Unavailable
from common.pb import worker_pb2
from services.kvtransfer.copying import guarded
from services.kvtransfer.nixl_agent import READ_FAILED, NixlError, NixlSource, read_descriptors
from services.kvtransfer.transports.base import LocalKV, SharedReads, Source, Transport, check_pool, register


@register
class Nixl(Transport):
    name = "nixl"
    rank = 10
    reads_pool = True
    stages_hand_offs = True
    source_field = "nixl"
    read_failed = READ_FAILED

    def offered(self, local: LocalKV) -> bool:
        return local.nixl is not None

    def source(self, local: LocalKV, pool_blocks: list[int]) -> worker_pb2.KVPush.SharedSource:
        return worker_pb2.KVPush.SharedSource(nixl=local.nixl.source().to_pb(), block_table=pool_blocks)

    def hold(self, local: LocalKV) -> None:
        local.nixl.hold_progress()

    def release(self, local: LocalKV) -> None:
        local.nixl.release_progress()

    def reads_here(self, reads: SharedReads | None) -> bool:
        return reads is not None and reads.nixl is not None

    def open(self, pb: worker_pb2.KVPush.SharedSource, reads: SharedReads | None, store) -> Source:
        if not self.reads_here(reads):
            raise FailedPrecondition("this worker does not read KV with NIXL (DOPD_KV_TRANSPORT, or NIXL not "
                                     "installed)")
        source = NixlSource.from_pb(pb.nixl)
        check_pool(source.shape, source.dtype, pb.block_table, store, "NIXL")
        try:
            reads.nixl.connect(source)  # before anything is reserved: a refusal lets the sender send bytes
        except NixlError as exc:
            raise FailedPrecondition(str(exc)) from None
        return Source(self, list(pb.block_table), source.shape[3], source)

    async def copy(self, source: Source, reads: SharedReads, sink, seq, start: int, end: int, layers: range) -> int:
        store = sink.receiving_store(seq)
        if store.kv is not reads.nixl.pool:
            raise FailedPrecondition("this request's KV does not go into the pool NIXL reads into")
        peer: NixlSource = source.pool
        remote, local = read_descriptors(
            peer.address, peer.shape, source.block_table, store.kv.data_ptr(), tuple(store.kv.shape),
            store.pool_blocks(seq.block_table), store.kv.element_size(), start, end, layers.start, layers.stop)
        try:
            return await guarded(sink, seq, reads.nixl_executor, reads.nixl.read, peer, remote, local, reads.timeout_s)
        except NixlError as exc:
            raise Unavailable(f"{READ_FAILED} {peer.agent_name}: {exc}") from None
