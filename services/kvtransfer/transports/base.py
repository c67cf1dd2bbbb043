"""The KV transport protocol, its registry by name, and what DOPD_KV_TRANSPORT makes of it.

A transport is how a request's KV goes from the worker that holds it (a prefill worker handing
off, a decode worker migrating) to the worker that takes it, over the one PushKV stream:
- its bytes in `chunk`s (grpc: always there, every worker takes them);
- or `ready` notices, while the receiver reads the sender's pool itself (`reads_pool`: shm, nixl).

Each transport says, on the sending side, whether this worker offers it (`offered`), how `begin`
names the pool to read (`source`) and what the pool needs while it is read (`hold`, `release`);
on the receiving side, whether this worker reads it (`reads_here`), how a named pool is opened
(`open`: before anything is reserved, FAILED_PRECONDITION when it cannot, and the sender tries
the next transport) and how positions are copied out of it (`copy`). The transports register by
name, as the runners and predictors do; the rest of the worker never branches on their names.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from common.errors import FailedPrecondition, InvalidArgument
from common.kv.shared_memory import SharedPoolHandle
from common.pb import worker_pb2
from services.kvtransfer.nixl_agent import NixlEndpoint
from services.kvtransfer.peer_pools import PeerPools


@dataclass
class LocalKV:
    """This worker's pool as its peers may read it (the sending side)."""

    store: Any = None  # PagedKVStore: its `pool_blocks` name blocks in the pool peers read
    shared_pool: SharedPoolHandle | None = None  # shm: the pool, mapped by peers on this host
    nixl: NixlEndpoint | None = None  # nixl: this worker's agent, the pool registered


@dataclass
class SharedReads:
    """How this worker reads KV straight out of a peer's pool (the receiving side): mapped, on the
    same host (`pools`; None: not taken), or with NIXL reads (`nixl`; None: not taken), and the
    thread that copies (never the event loop's: a request's KV is megabytes)."""

    pools: PeerPools | None
    executor: Executor
    nixl: NixlEndpoint | None = None
    timeout_s: float = 30.0  # for one NIXL read
    # NIXL reads wait on a peer (a slow or dead one, up to timeout_s): on a thread of their own,
    # so that they hold up no other copy (None: `executor`).
    nixl_executor: Executor | None = None

    def __post_init__(self) -> None:
        if self.nixl_executor is None:
            self.nixl_executor = self.executor


@dataclass
class Source:
    """A peer's pool opened for one transfer: where the request's blocks are in it."""

    transport: Transport
    block_table: list[int]
    block_size: int
    pool: Any  # the transport's own handle: a mapped tensor (shm), a NixlSource (nixl)


class Transport:
    name = ""
    rank = 0  # `auto` tries the transports in rank order, lowest first
    reads_pool = False  # the receiver reads the sender's pool: `ready` notices instead of bytes
    stages_hand_offs = False  # a prefill hand-off may stage its KV for the receiver to read
    source_field = ""  # the KVPush.SharedSource field that names the sender's pool
    read_failed = ""  # marks an UNAVAILABLE that says the receiver's read of us failed

    # -- the sending side ----------------------------------------------------------------------
    def offered(self, local: LocalKV) -> bool:
        return True

    def source(self, local: LocalKV, pool_blocks: list[int]) -> worker_pb2.KVPush.SharedSource:
        raise NotImplementedError(f"{self.name} sends the bytes: no pool to name")

    def hold(self, local: LocalKV) -> None:
        """A push that peers read from our pool is open (until `release`)."""

    def release(self, local: LocalKV) -> None:
        pass

    @contextlib.asynccontextmanager
    async def while_read(self, local: LocalKV) -> AsyncIterator[None]:
        self.hold(local)
        try:
            yield
        finally:
            self.release(local)

    # -- the receiving side --------------------------------------------------------------------
    def reads_here(self, reads: SharedReads | None) -> bool:
        return not self.reads_pool

    def open(self, pb: worker_pb2.KVPush.SharedSource, reads: SharedReads | None, store) -> Source:
        raise NotImplementedError

    async def copy(self, source: Source, reads: SharedReads, sink, seq, start: int, end: int, layers: range) -> int:
        raise NotImplementedError


_REGISTRY: dict[str, Transport] = {}


def register(cls: type[Transport]) -> type[Transport]:
    _REGISTRY[cls.name] = cls()
    return cls


def get(name: str) -> Transport:
    return _REGISTRY[name]


def best_first() -> list[Transport]:
    return sorted(_REGISTRY.values(), key=lambda t: t.rank)


def settings() -> tuple[str, ...]:
    return ("auto", *(t.name for t in best_first()))


def preference(setting: str) -> list[Transport]:
    """What a sender tries, best first: every transport under `auto`; a named one, then those
    that every worker takes (gRPC)."""
    if setting not in settings():
        raise ValueError(f"DOPD_KV_TRANSPORT must be one of {settings()}, got {setting!r}")
    if setting == "auto":
        return best_first()
    return [get(setting), *(t for t in best_first() if not t.reads_pool and t.name != setting)]


def wants(setting: str, name: str) -> bool:
    """Whether the setting takes transport `name` at all (for nixl: an agent is started)."""
    return any(t.name == name for t in preference(setting))


def for_source(pb: worker_pb2.KVPush.SharedSource) -> Transport:
    """The transport whose pool a `begin`'s shared source names."""
    for transport in best_first():
        if transport.source_field and pb.HasField(transport.source_field):
            return transport
    raise InvalidArgument("a shared KV source names no pool")


def check_pool(shape: tuple[int, ...], dtype: str, block_table, store, kind: str) -> None:
    """A sender's pool this worker can copy from: our layout but for the number of blocks (else
    FAILED_PRECONDITION: the sender sends bytes), and a block table inside it."""
    ours = tuple(store.kv.shape)
    if len(shape) != 6 or (shape[:2] + shape[3:]) != (ours[:2] + ours[3:]) or dtype != store.layout.dtype_name:
        raise FailedPrecondition(f"the sender's KV pool {list(shape)} {dtype} does not match this "
                                 f"worker's {list(ours)} {store.layout.dtype_name}")
    if any(not 0 <= b < shape[2] - 1 for b in block_table):
        raise InvalidArgument(f"a {kind} KV source names blocks outside its pool")


class PeerBook:
    """What this worker knows of each peer's KV transports, for the prefill hand-off and for
    migration alike: what the peer advertises (WorkerInfo.kv_transports, learnt from the calls
    that name it) and what it refused to read from us (FAILED_PRECONDITION on `begin`), so that
    a refused transport is not tried with that peer again. Keyed by the peer's address."""

    def __init__(self) -> None:
        self._advertised: dict[str, frozenset[str]] = {}
        self._refused: dict[str, set[str]] = {}  # transport -> peer addresses

    def learn(self, address: str, advertised) -> None:
        self._advertised[address] = frozenset(advertised)

    def refused(self, address: str, transport: str) -> bool:
        """Records the refusal; True the first time (for the caller to log it once)."""
        seen = self._refused.setdefault(transport, set())
        first = address not in seen
        seen.add(address)
        return first

    def reads(self, address: str, transport: str) -> bool:
        """The peer advertised `transport` and has not refused it from us."""
        return transport in self._advertised.get(address, ()) and not self.has_refused(address, transport)

    def has_refused(self, address: str, transport: str) -> bool:
        return address in self._refused.get(transport, ())

    def to_try(self, address: str, setting: str, local: LocalKV) -> list[Transport]:
        """The transports to try with the peer, best first: the setting's, that this worker
        offers, and that the peer has not refused (gRPC is always there)."""
        return [t for t in preference(setting) if t.offered(local) and not self.has_refused(address, t.name)]
