"""grpc: the sender sends the KV's bytes in PushKV chunks (services/kvtransfer/wire.py). Always
there: every worker offers it and takes it, so it is every other transport's fallback."""

from __future__ import annotations

from services.kvtransfer.transports.base import Transport, register


@register
class GrpcBytes(Transport):
    name = "grpc"
    rank = 30
