"""The serving modes on real processes (tiny-random): `aggregated` (every worker prefills its own
requests in chunks that share its decode steps, no KV moved) and `dopd` (the scheduling policy:
ultra-short prompts prefilled on the decode worker, admission control refusing at once and
saying why). Greedy output stays identical to transformers' generate(), and nothing leaks."""

from __future__ import annotations

import asyncio
import random
import time
import urllib.request

import grpc
import pytest

from common.modeling.loader import load_model
from services.client import generate
from tests.helpers import assert_no_leaks, check_greedy_identity, start_cluster


def metric(address: str, name: str) -> float:
    body = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in body.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


def metrics_of(handle) -> dict[str, str]:
    return {p.name: p.metrics_address for p in handle.cluster.procs}


@pytest.fixture(scope="module")
def aggregated(redis_url, redis_prefix, tmp_path_factory):
    # A 64-token step budget: most prompts here take several chunks, and share steps with decodes.
    handle = start_cluster("tiny-random", tmp_path_factory.mktemp("aggregated"), redis_url, redis_prefix + "agg:",
                           prefill=1, decode=1, mode="aggregated", env={"DOPD_STEP_TOKEN_BUDGET": "64"})
    yield handle
    codes = handle.cluster.stop()
    assert all(code == 0 for code in codes.values()), codes


async def test_aggregated_serves_every_request_where_it_decodes(aggregated):
    assert sorted(aggregated.workers) == ["decode-0", "decode-1"]  # 1 + 1 workers, both decode
    model = load_model("tiny-random").model
    rng = random.Random(5)
    prompts = [[rng.randrange(3, model.config.vocab_size) for _ in range(n)] for n in (3, 64, 65, 200, 130, 17)]
    max_tokens = [12, 5, 20, 8, 1, 16]
    async with aggregated.channel() as ch:
        outs = await asyncio.gather(*(generate(ch, p, max_tokens=n, temperature=0.0)
                                      for p, n in zip(prompts, max_tokens, strict=True)))
    assert [o.completion_tokens for o in outs] == [len(o.token_ids) for o in outs]
    report = check_greedy_identity(model, prompts, [o.token_ids for o in outs], max_tokens, {2})
    assert report.exact + len(report.near_ties) == len(prompts)
    where = metrics_of(aggregated)
    local = sum(metric(where[w], "dopd_local_prefill_tokens_total") for w in aggregated.workers)
    moved = sum(metric(where[w], "dopd_kv_transfer_bytes_total") for w in aggregated.workers)
    assert local == sum(len(p) for p in prompts) and moved == 0
    assert metric(where["gateway"], "dopd_gateway_paths_total") == len(prompts)
    await assert_no_leaks(aggregated)


async def test_aggregated_frees_a_request_cancelled_mid_prefill(aggregated):
    prompt = list(range(10, 1010))  # 16 chunks of 64: still prefilling when cancelled
    async with aggregated.channel() as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(ch, prompt, max_tokens=50, temperature=0.0, timeout=0.05)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await assert_no_leaks(aggregated)
    async with aggregated.channel() as ch:  # and it serves on
        assert (await generate(ch, [5, 6, 7], max_tokens=3, temperature=0.0)).completion_tokens == 3


@pytest.fixture(scope="module")
def dopd_cluster(redis_url, redis_prefix, tmp_path_factory):
    # smollm2-cpu2 is the profile the policy reasons with here: a 1000-token prompt's prefill is
    # predicted at 1.65 s, past the 1 s TTFT SLO; a 4-token one is the shortest tenth of the
    # prompts below and fits a decode step's slack under the 500 ms TPOT SLO: ultra-short.
    yield from dopd_1p1d(redis_url, redis_prefix, tmp_path_factory, "dopd", slo_ttft_ms=1000.0, slo_tpot_ms=500.0)


def dopd_1p1d(redis_url, redis_prefix, tmp_path_factory, name: str, **slos):
    """A dopd-mode cluster of 1 prefill and 1 decode worker on tiny-random under these SLOs,
    with a static planner (it forecasts, it does not switch), stopped cleanly after."""
    handle = start_cluster("tiny-random", tmp_path_factory.mktemp(name), redis_url, f"{redis_prefix}{name}:",
                           prefill=1, decode=1, mode="dopd", planner="static", **slos)
    yield handle
    codes = handle.cluster.stop()
    assert all(code == 0 for code in codes.values()), codes


async def test_dopd_policy_prefills_ultra_short_prompts_where_they_decode_and_refuses_hopeless_ones(dopd_cluster):
    handle = dopd_cluster
    where = metrics_of(handle)
    model = load_model("tiny-random").model
    async with handle.channel() as ch:
        deadline = time.monotonic() + 30
        # Until the planner's first forecast reaches the gateway there is no policy (every prompt
        # takes the long path); it forecasts every interval from what it was told.
        while metric(where["gateway"], "dopd_gateway_paths_total{path=\"ultra-short\"}") == 0:
            assert time.monotonic() < deadline, "no forecast reached the gateway within 30 s"
            await asyncio.gather(*(generate(ch, list(range(5, 5 + n)), max_tokens=2, temperature=0.0)
                                   for n in (4, 4, 4, 4, 300)))
        local_before = metric(where["decode-0"], "dopd_local_prefill_tokens_total")
        prompts = [[7, 8, 9, 10], [11, 12, 13, 14]]
        outs = await asyncio.gather(*(generate(ch, p, max_tokens=10, temperature=0.0) for p in prompts))
        report = check_greedy_identity(model, prompts, [o.token_ids for o in outs], [10, 10], {2})
        assert report.exact + len(report.near_ties) == 2
        assert metric(where["decode-0"], "dopd_local_prefill_tokens_total") == local_before + 8
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(ch, list(range(5, 1005)), max_tokens=2, temperature=0.0)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "predicted time to first token" in err.value.details() and "1000 ms SLO" in err.value.details()
    assert metric(where["gateway"], "dopd_admission_refused_total") == 1
    await assert_no_leaks(handle)


@pytest.fixture(scope="module")
def seated_cluster(redis_url, redis_prefix, tmp_path_factory):
    # Under a 100-ms TPOT SLO, smollm2-cpu2 (the profile the policy reasons with) steps one
    # request in 59 ms and two in 105 ms: a decode worker has one seat.
    yield from dopd_1p1d(redis_url, redis_prefix, tmp_path_factory, "seated", slo_ttft_ms=60_000.0, slo_tpot_ms=100.0)


async def test_dopd_admission_seats_a_decode_batch_within_the_tpot_slo_and_queues_the_rest(seated_cluster):
    handle = seated_cluster
    where = metrics_of(handle)
    decode = where["decode-0"]
    prompts = [list(range(5 + i, 25 + i)) for i in range(4)]
    async with handle.channel() as ch:
        deadline = time.monotonic() + 30
        # No policy until the planner's first forecast reaches the gateway: until then, no seats.
        while metric(where["gateway"], "dopd_gateway_seat_waits_total") == 0:
            assert time.monotonic() < deadline, "no seat limit within 30 s"
            await asyncio.gather(*(generate(ch, p, max_tokens=8, temperature=0.0) for p in prompts[:2]))
        steps = metric(decode, "dopd_decode_batch_size_count")
        alone = metric(decode, 'dopd_decode_batch_size_bucket{le="1.0"}')
        waits = metric(where["gateway"], "dopd_gateway_seat_waits_total")
        outs = await asyncio.gather(*(generate(ch, p, max_tokens=12, temperature=0.0, ignore_eos=True)
                                      for p in prompts))
    # Every request is served, one at a time on the decode worker, the others waiting their turn.
    assert [len(o.token_ids) for o in outs] == [12] * 4
    model = load_model("tiny-random").model
    report = check_greedy_identity(model, prompts, [o.token_ids for o in outs], [12] * 4, {2})
    assert report.exact + len(report.near_ties) == 4
    new_steps = metric(decode, "dopd_decode_batch_size_count") - steps
    assert new_steps >= 4 * 11 and metric(decode, 'dopd_decode_batch_size_bucket{le="1.0"}') - alone == new_steps
    # The first to find the seat taken is counted; the others queue behind it.
    assert metric(where["gateway"], "dopd_gateway_seat_waits_total") - waits >= 1
    await assert_no_leaks(handle)
