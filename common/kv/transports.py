"""The KV transports by name, and what DOPD_KV_TRANSPORT makes of them: which a worker tries as a
sender, best first, and which it reads as a receiver. Pure.

    nixl   the receiver READs the sender's registered pool with NIXL (common/kv/nixl_transport.py):
           one host or several, host or GPU memory
    shm    the receiver copies out of the sender's pool mapped on the same host
           (common/kv/shared_memory.py): CPU pools only, migrations only
    grpc   the sender sends the bytes in PushKV chunks: always there, every worker takes them

A sender tries its transports in order for each receiver; one the receiver cannot read is
refused before anything is reserved, and the next is tried (services/decode/migration.py,
services/kvtransfer/staged_sender.py).
"""

from __future__ import annotations

BEST_FIRST = ("nixl", "shm", "grpc")
SETTINGS = ("auto", *BEST_FIRST)


def preference(setting: str) -> list[str]:
    """What a sender tries, best first: every transport under `auto`; a named one, then gRPC."""
    if setting not in SETTINGS:
        raise ValueError(f"DOPD_KV_TRANSPORT must be one of {SETTINGS}, got {setting!r}")
    return list(BEST_FIRST) if setting == "auto" else list(dict.fromkeys([setting, "grpc"]))


def wants(setting: str, transport: str) -> bool:
    """Whether the setting takes `transport` at all (for nixl: an agent is started)."""
    return transport in preference(setting)


class PeerBook:
    """What this worker knows of each peer's KV transports, for the prefill hand-off and for
    migration alike: what the peer advertises (WorkerInfo.kv_transports, learnt from the calls
    that name it) and what it refused to read from us (FAILED_PRECONDITION on `begin`), so that
    a refused transport is not tried with that peer again. Pure; keyed by the peer's address."""

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

    def to_try(self, address: str, setting: str, offered: dict[str, bool]) -> list[str]:
        """The transports to try with the peer, best first: the setting's, that this worker
        offers (`offered`), and that the peer has not refused (gRPC is always there)."""
        return [t for t in preference(setting) if offered.get(t, t == "grpc") and not self.has_refused(address, t)]
