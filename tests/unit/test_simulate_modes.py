"""The serving modes in virtual time: aggregated (chunked prefill on every worker), DOPD's
scheduling policy (long, short bound late, ultra-short on the decode worker, admission), the
chunked-prefill core and the mixed step's cost, against hand-computed times."""

from __future__ import annotations

import copy

import pytest

from common.load import SLO, LengthDist, LoadForecast
from common.modes import MODES, serving_mode
from common.profile import LatencyProfile, load_profile
from common.types import Role
from services.bench.workloads import generate
from services.decode.local_prefill import LocalPrefill
from services.gateway.scheduling import SchedulingPolicy
from services.simulate.cluster import Cluster
from services.simulate.events import EventLoop
from services.simulate.sim import SimConfig, simulate
from tests.unit.test_simulate import DOC, LINK_GBPS


@pytest.fixture
def profile() -> LatencyProfile:
    return LatencyProfile.from_dict(copy.deepcopy(DOC))


def cluster(profile, mode: str, prefill=1, decode=1, chunk_tokens=100, timeout=600.0):
    loop = EventLoop()
    return loop, Cluster(loop, profile, prefill, decode, kv_blocks=256, block_size=16, max_batch_size=8,
                         prefill_token_budget=512, link_gbps=LINK_GBPS, request_timeout_s=timeout,
                         mode=serving_mode(mode), chunk_tokens=chunk_tokens)


def test_local_prefill_takes_chunks_first_come_first_served_under_the_step_budget():
    q = LocalPrefill(step_token_budget=100)
    q.add("a", 150)
    q.add("b", 30)
    first = q.take(decoding=10)  # 90 tokens of room
    assert [(c.job, c.start, c.end, c.last) for c in first] == [("a", 0, 90, False)]
    second = q.take(decoding=0)  # a's last 60, then 40 of room: b whole
    assert [(c.job, c.start, c.end, c.last) for c in second] == [("a", 90, 150, True), ("b", 0, 30, True)]
    assert not q and q.take(0) == []
    q.add("c", 5)
    assert [(c.job, c.end) for c in q.take(decoding=500)] == [("c", 1)]  # never starved: one token
    assert q.tokens_waiting == 4 and q.remove("c") and not q.remove("c")


def test_a_mixed_step_reads_the_weights_once_and_adds_the_decodes_attention(profile):
    assert profile.mixed_step_time(0, 0, 150) == pytest.approx(profile.prefill_time(150))
    assert profile.mixed_step_time(4, 200, 0) == pytest.approx(profile.decode_step_time(4, 200))
    # prefill(100 + 4) + decode(4, 300) - decode(4, 100) = 1.04 + (0.06 - 0.02)
    assert profile.mixed_step_time(4, 300, 100) == pytest.approx(1.04 + 0.04)


def test_aggregated_prefills_in_chunks_on_the_decode_worker_with_no_kv_moved(profile):
    loop, c = cluster(profile, "aggregated")
    assert [w.state.role for w in c.workers] == [Role.DECODE, Role.DECODE]
    c.submit([(0.0, 150, 3)])
    loop.run()
    (r,) = c.results()
    # Two chunks, 100 then 50 tokens, each a step of its own: 1.0 + 0.5 s; no link used.
    assert r.ok and r.ttft == pytest.approx(1.0 + 0.5)
    assert all(w.link.bytes_sent == 0 for w in c.workers) and c.prefill_batches == 0
    assert r.itls == pytest.approx([profile.decode_step_time(1, 151), profile.decode_step_time(1, 152)])
    assert c.leaks() == []


def test_aggregated_decodes_slow_down_while_a_prompt_shares_their_steps(profile):
    loop, c = cluster(profile, "aggregated", prefill=0, decode=1)
    c.submit([(0.0, 100, 200), (1.5, 100, 2)])  # the second prompt arrives while the first decodes
    loop.run()
    first, second = c.results()
    assert first.ok and second.ok and c.leaks() == []
    # The second prompt shares two steps with the first's decode (99 tokens, then its last one):
    # the first's tokens wait for those mixed steps, which cost a prefill each.
    i = first.itls.index(max(first.itls))
    assert first.itls[i] > 50 * min(first.itls)  # prefill(99 + 1) and the decode's attention
    assert first.itls[i] + first.itls[i + 1] == pytest.approx(second.ttft, rel=0.02)


def _policy(profile, long_above, ultra_short_up_to, wait_cap=0.5, ttft_slo=5.0):
    return SchedulingPolicy(long_above=long_above, ultra_short_up_to=ultra_short_up_to, batch_token_cap=1000,
                            batch_wait_cap_s=wait_cap, slo=SLO(ttft_slo, 1.0), profile=profile)


def _forecast(lengths):
    return LoadForecast(rate=1.0, prompt=LengthDist.from_samples(lengths), output=LengthDist.constant(4))


def test_the_policy_sends_each_path_its_own_way(profile):
    loop, c = cluster(profile, "dopd", prefill=1, decode=1)
    c.set_forecast(_forecast([20, 100, 300]), SLO(5.0, 1.0))  # thresholds from the forecast: built
    assert c.policy is not None and c.batcher is not None
    c.policy = _policy(profile, long_above=200, ultra_short_up_to=20, ttft_slo=30.0)
    c.submit([(0.0, 300, 2), (0.1, 120, 2), (0.2, 10, 2)])
    loop.run()
    long_, short, tiny = c.requests
    assert [r.error for r in c.results()] == [None, None, None] and c.leaks() == []
    assert long_.prefill_worker is c.workers[0] and short.prefill_worker is c.workers[0]
    assert tiny.prefill_worker is None  # ultra-short: prefilled where it decodes, no KV moved for it
    # The short prompt found the prefill worker busy with the long one: held, then sent when it
    # freed (bound late), not at its wait cap (0.5 s later).
    assert short.first_at > long_.first_at
    # The tiny one: one local step of 10 tokens (prefill(10) = 0.1 s) on the idle decode worker.
    assert tiny.first_at - tiny.t == pytest.approx(profile.prefill_time(10))


def test_admission_refuses_what_would_miss_the_ttft_slo_at_once(profile):
    loop, c = cluster(profile, "dopd")
    c.set_forecast(_forecast([300]), SLO(5.0, 1.0))
    c.policy = _policy(profile, long_above=0, ultra_short_up_to=0)  # all long
    c.submit([(0.0, 300, 2), (0.01, 300, 2), (0.02, 100, 2)])
    loop.run()
    # Alone, prefill(300) is 4 s; behind it prefill(600) is 10 s and prefill(400) 6 s, past 5 s.
    assert [r.error for r in c.results()] == [None, "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"]
    assert c.refused == 2 and c.leaks() == []


def test_every_mode_runs_a_phase_shift_to_the_end_without_leaks():
    reqs = generate("phase-shift", rate=12.0, duration=20.0, seed=3)
    for mode in MODES:
        out = simulate(reqs, SimConfig(load_profile("llama3-8b-h100"), 6, mode=mode, predictor="ewma",
                                       slo_ttft_s=0.3, slo_tpot_s=0.04))
        assert out.leaks == [] and len(out.results) == len(reqs), mode
        assert sum(r.ok for r in out.results) > 0.9 * len(reqs), mode
        assert (out.switches != []) <= serving_mode(mode).switching, mode  # only the planner's modes switch
        if not serving_mode(mode).disaggregated:
            assert {(s.prefill_workers, s.decode_workers) for s in out.samples} == {(0, 6)}
