"""A burst larger than the decode workers' KV waits in the gateway's bounded decode queue and is
served instead of being refused at once; past the queue's bound, the rest is refused at once with
RESOURCE_EXHAUSTED and a message (tiny-random, 1 prefill + 1 decode, a KV pool that holds 8 of
the burst's requests at a time). The queue's order (first come first served) is checked in
tests/unit/test_decode_queue.py: here a request's first token also waits on prefill batching.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from services.client import generate
from tests.helpers import assert_no_leaks, start_cluster

KV_BLOCKS = 56  # each request: 4 + 100 tokens = 7 blocks of 16, so 8 at a time
BURST = 40


@pytest.fixture(scope="module")
def small_kv_cluster(redis_url, tmp_path_factory):
    handle = start_cluster("tiny-random", tmp_path_factory.mktemp("burst"), redis_url, "dopd-test-burst:",
                           kv_blocks=KV_BLOCKS, env={"DOPD_DECODE_QUEUE_LIMIT": "20"})
    yield handle
    handle.cluster.stop()


async def _one(handle, i: int):
    """(the completion or the error, seconds it took)."""
    start = time.monotonic()
    async with handle.channel() as ch:
        try:
            out = await generate(ch, [200 + i, 300, 400, 500], max_tokens=100, temperature=0.0, ignore_eos=True,
                                 timeout=120)
        except grpc.aio.AioRpcError as exc:
            return exc, time.monotonic() - start
    return out, time.monotonic() - start


async def test_a_burst_waits_and_past_the_bound_is_refused_at_once(small_kv_cluster):
    results = await asyncio.gather(*(_one(small_kv_cluster, i) for i in range(BURST)))
    served = [(r, t) for r, t in results if not isinstance(r, grpc.aio.AioRpcError)]
    refused = [(r, t) for r, t in results if isinstance(r, grpc.aio.AioRpcError)]
    # 8 hold KV, 20 wait for it, the other 12 are refused.
    assert len(served) == 28 and len(refused) == 12, [r.details() for r, _ in refused[:3]]
    assert all(len(r.token_ids) == 100 for r, _ in served)
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r, _ in refused)
    assert all("already wait for decode KV" in r.details() for r, _ in refused)
    # Refused at once: before the first of the waiting ones was served.
    assert max(t for _, t in refused) < sorted(t for _, t in served)[8]
    await assert_no_leaks(small_kv_cluster)

