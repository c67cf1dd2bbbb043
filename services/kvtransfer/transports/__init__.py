"""The KV transports, registered by name (base.py has the protocol): nixl, shm and grpc. A new
one is a module here that subclasses `Transport` and registers itself, imported below."""

from services.kvtransfer.transports import grpc_bytes, nixl, shm  # noqa: F401 - they register themselves
from services.kvtransfer.transports.base import (
    LocalKV,
    PeerBook,
    SharedReads,
    Source,
    Transport,
    best_first,
    for_source,
    get,
    preference,
    settings,
    wants,
)

__all__ = ["LocalKV", "PeerBook", "SharedReads", "Source", "Transport", "best_first", "for_source", "get",
           "preference", "settings", "wants"]
