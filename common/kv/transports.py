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
