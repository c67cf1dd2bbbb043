"""shm: the receiver copies the KV out of the sender's pool, mapped on the same host
(common/kv/shared_memory.py). CPU pools only; migrations only (a prefill hand-off streams)."""

from __future__ import annotations

from common.errors import FailedPrecondition, InvalidArgument
from common.kv import device_copy
from common.kv.kv_store import slots_for
from common.kv.shared_memory import SharedPoolHandle
from common.pb import worker_pb2
from services.kvtransfer.copying import guarded
from services.kvtransfer.transports.base import LocalKV, SharedReads, Source, Transport, check_pool, register


@register
class SharedMemory(Transport):
    name = "shm"
    rank = 20
    reads_pool = True
    source_field = "pool"

    def offered(self, local: LocalKV) -> bool:
        return local.shared_pool is not None

    def source(self, local: LocalKV, pool_blocks: list[int]) -> worker_pb2.KVPush.SharedSource:
        return worker_pb2.KVPush.SharedSource(pool=local.shared_pool.to_pb(), block_table=pool_blocks)

    def reads_here(self, reads: SharedReads | None) -> bool:
        return reads is not None and reads.pools is not None

    def open(self, pb: worker_pb2.KVPush.SharedSource, reads: SharedReads | None, store) -> Source:
        if not self.reads_here(reads):
            raise FailedPrecondition("this worker does not map peers' KV pools (DOPD_KV_TRANSPORT)")
        handle = SharedPoolHandle.from_pb(pb.pool)
        check_pool(handle.shape, handle.dtype, pb.block_table, store, "shared")
        try:
            kv = reads.pools.open(handle)
        except OSError as exc:
            raise FailedPrecondition(f"cannot map the sender's KV pool: {exc}") from None
        # The pool as mapped (perhaps earlier, under the same id), not as this begin claims it.
        if tuple(kv.shape) != tuple(handle.shape) or any(not 0 <= b < kv.shape[2] - 1 for b in pb.block_table):
            raise InvalidArgument(f"a shared KV source claims a pool of shape {list(handle.shape)}, "
                                  f"but the pool mapped is {list(kv.shape)}")
        return Source(self, list(pb.block_table), handle.shape[3], kv)

    async def copy(self, source: Source, reads: SharedReads, sink, seq, start: int, end: int, layers: range) -> int:
        store = sink.receiving_store(seq)
        return await guarded(sink, seq, reads.executor, device_copy.on_side_stream, device_copy.pool_device(store),
                             store.copy_from_peer, source.pool, slots_for(source.block_table, start, end,
                                                                          source.block_size),
                             store.slots(seq.block_table, start, end), layers)
