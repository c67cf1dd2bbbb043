"""KV transports on real processes (tiny-random, 1 prefill + 3 decode workers): NIXL, gRPC, and a
mixed cluster. prefill-0, decode-0 and decode-1 take `nixl`; decode-2 takes gRPC chunks only.

- Hand-offs to decode-0/1 go layer by layer through NIXL reads of prefill-0's staging blocks;
  to decode-2 (it advertises no NIXL) prefill workers that offer NIXL send bytes: the mixed pair.
- decode-0 switched to prefill while decoding: its requests move to decode-1 by NIXL reads.
Greedy output stays identical to transformers' and no worker (prefill-0's staging included)
holds a block afterwards. A NIXL peer that dies mid-read is tests/unit/test_nixl_agent.py."""

from __future__ import annotations

import asyncio
import random
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.modeling.loader import load_model
from common.types import Role
from services.client import generate, worker_stats
from services.kvtransfer import nixl_agent
from tests.helpers import assert_no_leaks, check_greedy_identity, start_cluster
from tests.integration.test_role_switch import set_role

pytestmark = pytest.mark.skipif(not nixl_agent.available(), reason="NIXL is not installed (the nixl extra)")

NIXL = {"DOPD_KV_TRANSPORT": "nixl"}


@pytest.fixture(scope="module")
def mixed_cluster(redis_url, redis_prefix, tmp_path_factory):
    handle = start_cluster("tiny-random", tmp_path_factory.mktemp("kv-transports"), redis_url,
                           redis_prefix + "transports:", prefill=1, decode=3, kv_blocks=512, planner="off",
                           env={"DOPD_KV_TIMEOUT_S": "10"},
                           worker_env={"prefill-0": NIXL, "decode-0": NIXL, "decode-1": NIXL,
                                       "decode-2": {"DOPD_KV_TRANSPORT": "grpc"}})
    yield handle
    codes = handle.cluster.stop()
    assert all(code == 0 for code in codes.values()), f"a service did not drain cleanly: {codes}"


def kv_bytes(handle, name: str) -> dict[tuple[str, str], float]:
    """dopd_kv_transfer_bytes_total of one worker: (direction, transport) -> bytes."""
    proc = next(p for p in handle.cluster.procs if p.name == name)
    body = urllib.request.urlopen(f"http://{proc.metrics_address}/metrics", timeout=5).read().decode()
    return {(s.labels["direction"], s.labels["transport"]): s.value
            for family in text_string_to_metric_families(body) if family.name == "dopd_kv_transfer_bytes"
            for s in family.samples if s.name == "dopd_kv_transfer_bytes_total"}


def requests(n: int, vocab: int, seed: int, max_tokens: tuple[int, int]) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(8, 600))] for _ in range(n)]
    return prompts, [rng.randint(*max_tokens) for _ in range(n)]


async def serve(handle, prompts, max_tokens) -> list[list[int]]:
    async with handle.channel() as ch:
        outs = await asyncio.gather(*(generate(ch, p, max_tokens=n, temperature=0.0, timeout=120)
                                      for p, n in zip(prompts, max_tokens, strict=True)))
    return [o.token_ids for o in outs]


async def test_hand_offs_by_nixl_and_by_bytes_in_one_cluster(mixed_cluster):
    handle = mixed_cluster
    model = load_model("tiny-random").model
    prompts, max_tokens = requests(24, model.config.vocab_size, seed=11, max_tokens=(4, 24))
    outs = await serve(handle, prompts, max_tokens)
    # The mixed pair, for certain: with decode-0 and decode-1 prefilling for a while, every
    # hand-off goes to decode-2, from three prefill workers that offer NIXL to one that reads none.
    for name in ("decode-0", "decode-1"):
        await set_role(handle.workers[name], Role.PREFILL)
    try:
        more_prompts, more_tokens = requests(8, model.config.vocab_size, seed=13, max_tokens=(4, 24))
        outs += await serve(handle, more_prompts, more_tokens)
    finally:
        for name in ("decode-0", "decode-1"):
            await set_role(handle.workers[name], Role.DECODE)
    report = check_greedy_identity(model, prompts + more_prompts, outs, max_tokens + more_tokens, {2})
    print(f"nixl + grpc: {report.exact}/{report.requests} identical, near ties {report.near_ties}")
    await assert_no_leaks(handle)  # the prefill workers' staging blocks are back too
    names = ("prefill-0", "decode-0", "decode-1", "decode-2")
    got = {name: kv_bytes(handle, name) for name in names}
    total = {key: sum(got[n].get(key, 0.0) for n in names) for key in got["prefill-0"]}
    assert got["decode-0"][("received", "nixl")] + got["decode-1"][("received", "nixl")] > 0, got
    assert total[("sent", "nixl")] == total[("received", "nixl")], got  # every layer staged was read
    assert got["decode-2"][("received", "nixl")] == 0 and got["decode-2"][("received", "grpc")] > 0, got
    assert total[("sent", "grpc")] == got["decode-2"][("received", "grpc")], got


async def test_a_decode_worker_switched_away_moves_its_requests_by_nixl(mixed_cluster):
    handle = mixed_cluster
    model = load_model("tiny-random").model
    # decode-2 (gRPC only) steps aside first: decode-0's requests can only go to decode-1.
    await set_role(handle.workers["decode-2"], Role.PREFILL)
    try:
        prompts, max_tokens = requests(8, model.config.vocab_size, seed=12, max_tokens=(200, 300))
        served = asyncio.ensure_future(serve(handle, prompts, max_tokens))
        for _ in range(600):  # until decode-0 decodes several of them
            if (await worker_stats(handle.workers["decode-0"])).running_requests >= 2:
                break
            await asyncio.sleep(0.05)
        reply = await set_role(handle.workers["decode-0"], Role.PREFILL)
        outs = await served
    finally:
        for name in ("decode-0", "decode-2"):
            await set_role(handle.workers[name], Role.DECODE)
    assert reply.migrated_requests >= 2, reply
    assert reply.migrated_bytes_nixl == reply.migrated_bytes > 0, reply
    report = check_greedy_identity(model, prompts, outs, max_tokens, {2})
    print(f"moved by nixl: {reply.migrated_requests} requests, {reply.migrated_bytes / 1e6:.2f} MB, "
          f"{report.exact}/{report.requests} identical")
    await assert_no_leaks(handle)
