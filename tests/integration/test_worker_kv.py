"""A decode worker's side of the KV hand-off, driven directly over gRPC: bad pushes are refused
with INVALID_ARGUMENT and free the reservation; KV that never arrives is given up after the
timeout; a worker out of blocks says RESOURCE_EXHAUSTED."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
import torch

from common.convert import sampling_to_pb
from common.kv.layout import KVLayout
from common.modeling.loader import tiny_random_config
from common.pb import worker_pb2, worker_pb2_grpc
from common.rpc.channels import internal_channel
from common.rpc.errors import is_refusal
from common.types import SamplingParams
from services.client import generate
from services.kvtransfer import wire
from services.kvtransfer.wire import KVChunk
from tests.helpers import assert_no_leaks

CFG = tiny_random_config()
LAYOUT = KVLayout(CFG.num_hidden_layers, CFG.num_key_value_heads, CFG.head_dim, torch.float32)


def decode_stub(cluster):
    return worker_pb2_grpc.WorkerStub(internal_channel(cluster.workers["decode-0"]))


async def reserve(stub, prompt_len: int, max_tokens: int = 8):
    request_id = uuid.uuid4().hex
    call = stub.Decode(worker_pb2.DecodeRequest(
        request_id=request_id, prompt_len=prompt_len,
        sampling=sampling_to_pb(SamplingParams(max_tokens=max_tokens, stop_token_ids=frozenset({2})))), timeout=30)
    event = await call.read()
    assert event.WhichOneof("event") == "reserved"
    return request_id, call


async def push(stub, messages):
    async def gen():
        for m in messages:
            yield m
    return await stub.PushKV(gen(), timeout=10)


def good_transfer(request_id: str, num_tokens: int, first_token: int = 5):
    kv = torch.randn(LAYOUT.num_layers, 2, num_tokens, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    return [wire.begin_message(request_id, num_tokens, LAYOUT),
            wire.chunk_message(KVChunk(0, LAYOUT.num_layers, 0, num_tokens, kv)),
            wire.end_message(first_token)]


async def test_good_push_then_tokens(tiny_cluster):
    stub = decode_stub(tiny_cluster)
    request_id, call = await reserve(stub, 10, max_tokens=4)
    reply = await push(stub, good_transfer(request_id, 10))
    assert reply.bytes_received == LAYOUT.bytes_for(10)
    events = []
    while (event := await call.read()) is not grpc.aio.EOF:
        events.append(event)
    assert sum(len(e.tokens.token_ids) for e in events if e.WhichOneof("event") == "tokens") >= 1
    assert events[-1].WhichOneof("event") == "finished"
    await assert_no_leaks(tiny_cluster)


BAD = {
    "unknown request": lambda rid: good_transfer("no-such-request", 10),
    "no begin": lambda rid: good_transfer(rid, 10)[1:],
    "layout mismatch": lambda rid: [wire.begin_message(rid, 10, KVLayout(3, 2, 16, torch.float32))],
    "wrong token count": lambda rid: good_transfer(rid, 11),
    "short chunk": lambda rid: [wire.begin_message(rid, 10, LAYOUT), worker_pb2.KVPush(chunk=worker_pb2.KVPush.Chunk(
        layer_start=0, layer_end=1, token_start=0, token_end=10, data=b"\0" * 100)), wire.end_message(5)],
    "tokens out of range": lambda rid: [wire.begin_message(rid, 10, LAYOUT), worker_pb2.KVPush(
        chunk=worker_pb2.KVPush.Chunk(layer_start=0, layer_end=1, token_start=5, token_end=20, data=b""))],
    "missing layers": lambda rid: [good_transfer(rid, 10)[0], wire.chunk_message(KVChunk(
        0, 1, 0, 10, torch.zeros(1, 2, 10, LAYOUT.num_kv_heads, LAYOUT.head_dim))), wire.end_message(5)],
    "no end": lambda rid: good_transfer(rid, 10)[:2],
    "first token outside vocab": lambda rid: good_transfer(rid, 10, first_token=10**7),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_malformed_push_is_invalid_argument(tiny_cluster, case):
    stub = decode_stub(tiny_cluster)
    request_id, call = await reserve(stub, 10)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await push(stub, BAD[case](request_id))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    if case in ("unknown request", "no begin"):
        call.cancel()  # the reservation was never touched: the client gives it up
    else:
        # The request cannot complete: its decode stream ends with the same error.
        with pytest.raises(grpc.aio.AioRpcError) as stream_err:
            await call.read()
        assert stream_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await assert_no_leaks(tiny_cluster)
    async with tiny_cluster.channel() as ch:
        assert (await generate(ch, [1, 2, 3], max_tokens=2)).completion_tokens == 2


async def test_kv_that_never_arrives_is_given_up(tiny_cluster):
    # The cluster runs with DOPD_KV_TIMEOUT_S=3.
    stub = decode_stub(tiny_cluster)
    _, call = await reserve(stub, 10)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(call.read(), 15)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not arrive" in err.value.details()
    await assert_no_leaks(tiny_cluster)


async def test_out_of_blocks(tiny_cluster):
    # 1536 blocks of 16 tokens; each reservation below takes 1000 + 999 tokens = 125 blocks: 12 fit.
    stub = decode_stub(tiny_cluster)
    held = [await reserve(stub, 1000, max_tokens=1000) for _ in range(12)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await reserve(stub, 1000, max_tokens=1000)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "out of KV blocks" in err.value.details()
    async with tiny_cluster.channel() as ch:
        # The gateway waits in its decode queue for KV to free up, until just before the deadline.
        with pytest.raises(grpc.aio.AioRpcError) as gw_err:
            await generate(ch, list(range(3, 1003)), max_tokens=1000, timeout=3)
        assert gw_err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "no decode KV or seat freed up within" in gw_err.value.details()
        assert "no decode worker can hold" in gw_err.value.details()
    for _, call in held:
        call.cancel()
    await assert_no_leaks(tiny_cluster)


async def test_prefill_on_a_decode_worker_is_refused(tiny_cluster):
    stub = decode_stub(tiny_cluster)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Prefill(worker_pb2.PrefillRequest(request_id="x", prompt_token_ids=[1, 2],
                                                     decode_address="127.0.0.1:1"), timeout=5)
    # Refused before any work, and marked so: the gateway may try another worker.
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert is_refusal(err.value)
