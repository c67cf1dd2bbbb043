"""The sim engine through the real services: latency comes from the profile, KV transfers carry
the profiled model's bytes, tokens are deterministic, and blocks are accounted as for real."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest

from common.modeling.sim_runner import pseudo_token
from services.client import generate
from tests.helpers import assert_no_leaks, start_cluster

PROFILE = {
    "name": "test-flat",
    "model": {"num_layers": 4, "num_kv_heads": 2, "head_dim": 32, "dtype": "bfloat16", "vocab_size": 32000,
              "max_context": 4096},
    "prefill": {"tokens": [1, 4096], "seconds": [0.3, 0.3]},
    "decode": {"batch": [1, 64], "context": [1, 4096], "seconds": [[0.05, 0.05], [0.05, 0.05]]},
}
KV_BYTES_PER_TOKEN = 2 * 4 * 2 * 32 * 2


@pytest.fixture(scope="module")
def sim_cluster(redis_url, redis_prefix, tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "test-flat.json"
    path.write_text(json.dumps(PROFILE))
    handle = start_cluster(f"sim:{path}", tmp_path_factory.mktemp("sim-cluster"), redis_url, redis_prefix + "sim:",
                           prefill=2, decode=2, kv_blocks=256)
    yield handle
    codes = handle.cluster.stop()
    assert all(code == 0 for code in codes.values()), codes


def metric(address: str, name: str) -> float:
    body = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in body.splitlines() if line.startswith(name))


async def test_sim_latency_follows_profile_and_kv_bytes_flow(sim_cluster):
    metrics_of = {p.name: p.metrics_address for p in sim_cluster.cluster.procs}
    sent_before = sum(metric(metrics_of[f"prefill-{i}"], "dopd_kv_transfer_bytes_total") for i in range(2))
    prompt = list(range(100, 400))
    async with sim_cluster.channel() as ch:
        start = time.perf_counter()
        outs = await asyncio.gather(*(generate(ch, prompt, max_tokens=10, temperature=0.0) for _ in range(4)))
        elapsed = time.perf_counter() - start
    # Each request waits at least one prefill (0.3 s) and 9 decode steps (0.05 s each).
    assert elapsed >= 0.3 + 9 * 0.05
    expected = [pseudo_token(prompt[-1], len(prompt))]
    for i in range(9):
        expected.append(pseudo_token(expected[-1], len(prompt) + i + 1))
    assert all(o.token_ids == expected for o in outs)
    sent = sum(metric(metrics_of[f"prefill-{i}"], "dopd_kv_transfer_bytes_total") for i in range(2)) - sent_before
    assert sent == 4 * len(prompt) * KV_BYTES_PER_TOKEN
    await assert_no_leaks(sim_cluster)


async def test_sim_blocks_are_accounted(sim_cluster):
    async with sim_cluster.channel() as ch:
        task = asyncio.create_task(generate(ch, list(range(100, 1100)), max_tokens=200, temperature=0.0))
        await asyncio.sleep(1.0)  # past the prefill: the request holds its blocks on a decode worker
        from services.client import worker_stats

        used = [(await worker_stats(sim_cluster.workers[f"decode-{i}"])).kv_blocks_used for i in range(2)]
        assert sorted(used) == [0, (1000 + 199 + 15) // 16]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await assert_no_leaks(sim_cluster)
