"""Every worker queue is bounded: past a prefill worker's queue limit, a request is refused at once
with RESOURCE_EXHAUSTED and a message that says which queue is full, the queued ones are served,
and nothing leaks (1 prefill + 1 decode on a sim profile whose every prefill takes 1 s). The
decode worker's bound is checked in tests/unit/test_decode_engine.py, the gateway's decode queue
in tests/integration/test_burst.py.
"""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest

from services.client import generate
from tests.helpers import assert_no_leaks, start_cluster
from tests.integration.test_worker_loss import SLOW_PREFILL

# test_worker_loss's model, with every prefill taking 1 s.
ONE_SECOND_PREFILL = {**SLOW_PREFILL, "name": "test-one-second-prefill",
                      "prefill": {"tokens": [1, 4096], "seconds": [1.0, 1.0]}}
BURST = 6
QUEUE_LIMIT = 2


async def _one(handle, i: int):
    start = time.monotonic()
    # 300-token prompts over a 256-token prefill budget: one prompt a forward.
    async with handle.channel() as ch:
        try:
            out = await generate(ch, list(range(100 + i, 400 + i)), max_tokens=4, temperature=0.0, timeout=60)
        except grpc.aio.AioRpcError as exc:
            return exc, time.monotonic() - start
    return out, time.monotonic() - start


@pytest.fixture
def sim_1p1d(redis_url, redis_prefix, tmp_path):
    path = tmp_path / "one-second-prefill.json"
    path.write_text(json.dumps(ONE_SECOND_PREFILL))
    limits = {"DOPD_PREFILL_QUEUE_LIMIT": str(QUEUE_LIMIT), "DOPD_PREFILL_TOKEN_BUDGET": "256"}
    handle = start_cluster(f"sim:{path}", tmp_path / "logs", redis_url, redis_prefix + "bounded:", prefill=1,
                           decode=1, kv_blocks=512, worker_env={"prefill-0": limits})
    yield handle
    handle.cluster.stop()


async def test_past_the_prefill_queue_limit_requests_are_refused_at_once(sim_1p1d):
    handle = sim_1p1d
    results = await asyncio.gather(*(_one(handle, i) for i in range(BURST)))
    served = [(r, t) for r, t in results if not isinstance(r, grpc.aio.AioRpcError)]
    refused = [(r, t) for r, t in results if isinstance(r, grpc.aio.AioRpcError)]
    # One in its forward and QUEUE_LIMIT queued behind it are served (one more if the first
    # left the queue for its forward before the others came); the rest are refused.
    assert QUEUE_LIMIT + 1 <= len(served) <= QUEUE_LIMIT + 2, [r.details() for r, _ in refused]
    assert all(len(r.token_ids) == 4 for r, _ in served)
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r, _ in refused)
    assert all("every prefill worker is overloaded" in r.details() and "prompts already wait" in r.details()
               for r, _ in refused), [r.details() for r, _ in refused]
    # Refused at once: before the first prefill (1 s) was over.
    assert max(t for _, t in refused) < min(t for _, t in served)
    await assert_no_leaks(handle)
