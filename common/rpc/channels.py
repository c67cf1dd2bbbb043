"""Channels to this cluster's services: the options every channel uses, a channel to a worker or
the planner (`internal_channel`: the cluster token, mutual TLS where configured), and one reusable
channel per peer address (`ChannelPool`). Servers take their own options from common/rpc/server.py."""

from __future__ import annotations

import grpc

from common.rpc.auth import TokenChannel, cluster_token

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # gRPC's default; larger messages get RESOURCE_EXHAUSTED
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Keepalive pings on open calls: a peer whose host died (not just its process) is noticed in
    # seconds, so a KV push or a decode stream to it fails instead of waiting out its deadline.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]


def internal_channel(address: str, token: str | None = None, options=None) -> grpc.aio.Channel | TokenChannel:
    """A channel to a worker or the planner, carrying the token (this process's by default), over
    mutual TLS when this process has TLS files (common/rpc/tls.py)."""
    from common.rpc.tls import channel_credentials, channel_options, tls_files

    options = list(options or CHANNEL_OPTIONS)
    files = tls_files()
    if files is None:
        channel = grpc.aio.insecure_channel(address, options=options)
    else:
        channel = grpc.aio.secure_channel(address, channel_credentials(files), options=options + channel_options(files))
    token = cluster_token() if token is None else token
    return TokenChannel(channel, token) if token else channel


class ChannelPool:
    """Channels to workers and the planner: every call on them carries the cluster token."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = internal_channel(address)
        return channel

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
