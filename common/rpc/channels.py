"""One reusable grpc.aio channel per peer address."""

from __future__ import annotations

import grpc

from common.rpc.auth import internal_channel


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
