"""A PushKV sender writes nothing after `begin` until the receiver has taken it (its initial
metadata, KV_ACCEPTED), so that a receiver's refusal reaches the sender as the receiver's own
status. Without it, a write racing the refusal fails and grpc.aio reports INTERNAL ("Internal
error from Core", grpc/grpc#36066): a migration then took a target with no room for a failure, and
a prefill worker missed that a decode worker refused to read it by NIXL. Real grpc.aio, loopback."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
import torch

from common.kv.layout import KVLayout
from common.pb import worker_pb2, worker_pb2_grpc
from services.kvtransfer import wire
from services.kvtransfer.sender import KV_ACCEPTED, KVSender

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float32)
READY = worker_pb2.KVPush(ready=worker_pb2.KVPush.Ready(token_start=0, token_end=4))


class Receiver(worker_pb2_grpc.WorkerServicer):
    """Refuses every other push on `begin`; takes the rest (as receive_kv would: metadata, then
    every message up to `end`)."""

    def __init__(self) -> None:
        self.pushes = 0

    async def PushKV(self, request_iterator, context):
        self.pushes += 1
        begin = await anext(aiter(request_iterator))
        assert begin.WhichOneof("part") == "begin"
        if self.pushes % 2:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "no room for it here")
        await context.send_initial_metadata(KV_ACCEPTED)
        count = 0
        async for message in request_iterator:
            count += 1
            if message.WhichOneof("part") == "end":
                break
        return worker_pb2.PushKVResponse(bytes_received=count)


@pytest.fixture
async def stub():
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield worker_pb2_grpc.WorkerStub(channel)
    await server.stop(None)


async def test_a_refusal_on_begin_reaches_the_sender_as_itself(stub):
    loop = asyncio.get_running_loop()
    outcomes = []
    rng = random.Random(5)
    for i in range(300):
        sender = KVSender(loop, stub, wire.begin_message(f"r{i}", 4, LAYOUT), LAYOUT, 10.0, 1, 1 << 20)
        await asyncio.sleep(rng.random() * 0.002)  # around the refusal's arrival
        sender.put_messages([READY] * 20)
        sender.finish(7)
        try:
            outcomes.append(await sender.wait_raw())
        except grpc.aio.AioRpcError as exc:
            outcomes.append((exc.code(), exc.details()))
    refused = outcomes[0::2]
    assert refused == [(grpc.StatusCode.RESOURCE_EXHAUSTED, "no room for it here")] * 150
    assert outcomes[1::2] == [21] * 150  # accepted: every message after begin arrived, end last
