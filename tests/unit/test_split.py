"""services/planner/split.py: hand-computed cases on small synthetic profiles, then the shipped one.

Bucket masses of LengthDist.buckets() (levels 0.1 .. 0.99): .175 .2 .25 .2 .12 .055.
"""

from __future__ import annotations

import itertools
import random

import pytest

from common.load import SLO, LengthDist, LoadForecast
from common.profile import LatencyProfile, load_profile
from services.planner.split import compute_split, decode_need, fit_split, prefill_need

MODEL = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 4, "dtype": "float16", "vocab_size": 100,
         "max_context": 8192}
# Decode step t(b, c) = 0.01 + 0.0005 b + 1e-6 b c: bilinear, so the grid reproduces it exactly.
# At context 250: t(b) = 0.01 + 0.00075 b.
DECODE = {"batch": [1, 101], "context": [0, 1000], "seconds": [[0.0105, 0.0115], [0.0605, 0.1615]]}


def profile(tokens: list[float], seconds: list[float]) -> LatencyProfile:
    return LatencyProfile.from_dict({"name": "t", "model": MODEL, "decode": DECODE,
                                     "prefill": {"tokens": tokens, "seconds": seconds}})


LINEAR = profile([100, 1000], [0.1, 1.0])  # 1 ms a token, through the origin
CONVEX = profile([0, 1000, 2000, 4000], [0.0, 0.1, 0.4, 1.6])  # slopes 0.1, 0.3, 0.6 ms a token
FIXED = profile([0, 1000], [0.01, 0.11])  # GPU-like: 10 ms a forward + 0.1 ms a token

HEAVY = (500, 500, 850, 1250, 2000, 2000)  # bucket mean 87.5+100+212.5+250+240+110 = 1000
SLO_ = SLO(ttft_s=1.0, tpot_s=0.0405)  # at context 250: b <= 0.0305 / 0.00075 = 40.7 -> 40
KV = dict(kv_blocks=1000, block_size=16, max_batch_size=64)


def forecast(rate: float, prompt: LengthDist, output: LengthDist | None = None) -> LoadForecast:
    return LoadForecast(rate, prompt, output or LengthDist.constant(100))


def test_heavy_fixture_has_the_same_bucket_mean():
    assert sum(length * p for length, p in LengthDist(HEAVY, 1000).buckets()) == pytest.approx(1000)


# -- prefill --------------------------------------------------------------------------------------

def test_prefill_by_hand_linear():
    # P = 200: w = 0.2 s (the batch share 200/512 * 0.512 is the same on a line), rate 10 -> 2 s/s.
    # R = E[w^2] / 2E[w] = 0.1; S = 0.2, slack 0.8 -> rho_max = 0.8 / 0.9 = 0.889 (under the cap).
    f = prefill_need(10, LengthDist.constant(200), LINEAR, SLO_, token_budget=512, max_utilisation=0.95)
    assert f.mean_work_s == pytest.approx(0.2)
    assert f.residual_s == pytest.approx(0.1)
    assert f.service_s == pytest.approx(0.2)
    assert f.rho_max == pytest.approx(8 / 9)
    assert f.work_per_s == pytest.approx(2.0)
    assert f.capacity_rps == pytest.approx((8 / 9) / 0.2)  # 4.44 requests/s a worker
    assert f.need == pytest.approx(2.25)
    assert f.ttft_feasible


def test_prefill_utilisation_cap_and_overhead():
    # Same load, cap 0.8 < 0.889: rho_max = 0.8, need = 2 / 0.8 = 2.5.
    f = prefill_need(10, LengthDist.constant(200), LINEAR, SLO_, token_budget=512, max_utilisation=0.8)
    assert (f.rho_max, f.need) == (pytest.approx(0.8), pytest.approx(2.5))
    # 0.3 s outside the forward (KV transfer, first step): slack 0.5, rho 0.5 / 0.6, need 2.4.
    f = prefill_need(10, LengthDist.constant(200), LINEAR, SLO_, token_budget=512, max_utilisation=0.95,
                     ttft_overhead_s=0.3)
    assert (f.rho_max, f.need) == (pytest.approx(5 / 6), pytest.approx(2.4))


def test_prefill_infeasible_ttft_plans_at_the_floor():
    # The p90 prompt alone takes 0.2 s > 0.15 s: no utilisation helps; plan at min_utilisation.
    f = prefill_need(10, LengthDist.constant(200), LINEAR, SLO(0.15, 0.04), token_budget=512, min_utilisation=0.1)
    assert not f.ttft_feasible
    assert (f.rho_max, f.need) == (pytest.approx(0.1), pytest.approx(20.0))


def test_batching_credit_shares_the_fixed_cost():
    # P = 100 on FIXED, budget 1000: alone 0.01 + 0.01 = 0.02 s; as a tenth of a full
    # budget's forward (0.11 s) 0.011 s. Credited: 0.011; switched off: 0.02.
    kw = dict(token_budget=1000, max_utilisation=0.95)
    on = prefill_need(10, LengthDist.constant(100), FIXED, SLO_, **kw)
    off = prefill_need(10, LengthDist.constant(100), FIXED, SLO_, credit_batching=False, **kw)
    assert on.mean_work_s == pytest.approx(0.011)
    assert off.mean_work_s == pytest.approx(0.02)
    # On a convex curve through the origin the "share" would cost more (1000/4000 * 1.6 = 0.4 s
    # vs 0.1 s): the credit never becomes a charge.
    assert prefill_need(1, LengthDist.constant(1000), CONVEX, SLO_, token_budget=4000).mean_work_s == \
        pytest.approx(0.1)


def test_distribution_not_mean_matters_under_a_convex_profile():
    light, heavy = LengthDist.constant(1000), LengthDist(HEAVY, 1000)
    kw = dict(token_budget=512, max_utilisation=0.95)
    # Linear profile: same mean, same work (1 s a request); only the tail's TTFT differs.
    assert prefill_need(1, light, LINEAR, SLO(2.0, 1), **kw).work_per_s == pytest.approx(1.0)
    assert prefill_need(1, heavy, LINEAR, SLO(2.0, 1), **kw).work_per_s == pytest.approx(1.0)
    # Convex: light w = 0.1 s. Heavy: w = .05 .05 .085 .175 .4 .4, E[w] = 0.145 s (not 0.1).
    lf = prefill_need(10, light, CONVEX, SLO_, **kw)
    hf = prefill_need(10, heavy, CONVEX, SLO_, **kw)
    assert lf.mean_work_s == pytest.approx(0.1)
    assert hf.mean_work_s == pytest.approx(0.145)
    # Light: R = 0.05, S = 0.1, slack 0.9, rho = 0.9 / 0.95 = 0.947 -> need 1.0 / 0.947 = 1.056.
    assert lf.need == pytest.approx(0.95 / 0.9)
    # Heavy: E[w^2] = 0.03686875, R = 0.127134, S = p90 = prefill(2000) = 0.4, slack 0.6,
    # rho = 0.6 / 0.727134 = 0.82516 -> need 1.45 / 0.82516 = 1.7572.
    assert hf.residual_s == pytest.approx(0.03686875 / 0.29)
    assert hf.rho_max == pytest.approx(0.6 / (0.6 + 0.03686875 / 0.29))
    assert hf.need == pytest.approx(1.7572, abs=1e-4)
    # Into 4 workers, with the decode need of both (context 1050, 69 blocks -> c_kv 14 < c_tpot 19,
    # step 0.0317 s, need 31.7 / 14 = 2.264): light 1.056 vs 2.264 -> D2, 1.056 vs 1.132 -> D3;
    # heavy 1.757 vs 2.264 -> D2, 1.757 vs 1.132 -> P2.
    split = {name: compute_split(forecast(10, dist), CONVEX, SLO_, 4, prefill_token_budget=512,
                                 max_utilisation=0.95, decode_occupancy=1.0, **KV)
             for name, dist in (("light", light), ("heavy", heavy))}
    assert split["light"].detail["decode_need"] == pytest.approx(31.7 / 14)
    assert (split["light"].prefill, split["light"].decode) == (1, 3)
    assert (split["heavy"].prefill, split["heavy"].decode) == (2, 2)


# -- decode ---------------------------------------------------------------------------------------

def test_decode_by_hand_tpot_limited():
    # P = 200, O = 100: context 200 + 50 = 250; t(b) = 0.01 + 0.00075 b <= 0.0405 -> c_tpot = 40.
    # KV: ceil((200 + 100 - 1) / 16) = ceil(18.7) = 19 blocks -> c_kv = 1000 // 19 = 52.
    # c_max = 40, step t(40) = 0.04; concurrency = 10 * 100 * 0.04 = 40 -> need 40 / 40 = 1.0.
    f = decode_need(10, LengthDist.constant(200), LengthDist.constant(100), LINEAR, SLO_, occupancy=1.0, **KV)
    assert f.context == pytest.approx(250)
    assert f.blocks_per_request == 19
    assert (f.c_tpot, f.c_kv, f.c_max, f.limited_by) == (40, 52, 40, "tpot")
    assert f.step_s == pytest.approx(0.04)
    assert f.concurrency == pytest.approx(40.0)
    assert f.need == pytest.approx(1.0)
    # Occupancy 0.8: need 40 / (40 * 0.8) = 1.25.
    f = decode_need(10, LengthDist.constant(200), LengthDist.constant(100), LINEAR, SLO_, occupancy=0.8, **KV)
    assert f.need == pytest.approx(1.25)


def test_decode_kv_limited_and_batch_limited():
    p, o = LengthDist.constant(200), LengthDist.constant(100)
    # 400 blocks // 19 = 21 < 40: KV binds. t(21) = 0.02575, concurrency 25.75, need 25.75/21.
    f = decode_need(10, p, o, LINEAR, SLO_, kv_blocks=400, block_size=16, max_batch_size=64, occupancy=1.0)
    assert (f.c_kv, f.c_max, f.limited_by) == (21, 21, "kv")
    assert f.step_s == pytest.approx(0.02575)
    assert f.need == pytest.approx(25.75 / 21)
    # max_batch_size 16 < 40: the batch cap binds. t(16) = 0.022, concurrency 22, need 22/16.
    f = decode_need(10, p, o, LINEAR, SLO_, kv_blocks=1000, block_size=16, max_batch_size=16, occupancy=1.0)
    assert (f.c_tpot, f.c_max, f.limited_by) == (16, 16, "max_batch_size")
    assert f.need == pytest.approx(22 / 16)


def test_decode_infeasible_tpot_plans_one_seat():
    # t(1, 250) = 0.01075 > 0.005: no batch fits; one request a worker, flagged.
    f = decode_need(10, LengthDist.constant(200), LengthDist.constant(100), LINEAR, SLO(1.0, 0.005),
                    occupancy=1.0, **KV)
    assert (f.c_tpot, f.c_max, f.tpot_feasible) == (0, 0, False)
    assert f.need == pytest.approx(10 * 100 * 0.01075)


def test_decode_output_tail_weighs_in_kv_and_context():
    # Outputs HEAVY / 10 = 50 50 85 125 200 200: bucket mean 100, like the constant 100.
    # A request stays O steps, so each bucket weighs p * O:
    #   blocks ceil((199 + O) / 16) = 16 16 18 21 25 25;
    #   sum p O blocks = 140 + 160 + 382.5 + 525 + 600 + 275 = 2082.5 -> 20.825 per request (not 19)
    #   -> c_kv = 1000 // 20.825 = 48 (not 52). DOPD's ceil((200 + 100/2) / 16) = 16 would say 62.
    #   context = 200 + E[O^2] / 2E[O] = 200 + 12868.75 / 200 = 264.34 (not 250).
    tail = LengthDist(tuple(x / 10 for x in HEAVY), 100)
    f = decode_need(10, LengthDist.constant(200), tail, LINEAR, SLO_, occupancy=1.0, **KV)
    assert f.blocks_per_request == pytest.approx(20.825)
    assert f.c_kv == 48
    assert f.context == pytest.approx(264.34375)


# -- fitting --------------------------------------------------------------------------------------

def test_fit_spare_goes_to_least_headroom():
    # Needs 2.25 P, 1.0 D into 8. From 1/1, each worker to the higher need/count:
    # 2.25 vs 1 -> P2; 1.125 vs 1 -> P3; .75 vs 1 -> D2; .75 vs .5 -> P4; .5625 vs .5 -> P5;
    # .45 vs .5 -> D3. Needs 3 + 1 met first, the 4 spare split 2/2 by headroom.
    assert fit_split(2.25, 1.0, 8) == (5, 3, "spare")


def test_fit_exact_and_shortfall_balanced():
    assert fit_split(3, 2, 5) == (3, 2, "exact")
    # Shortfall 9 + 3 into 6: P2 (4.5 vs 3), P3 (3 vs 3: tie -> smaller role) D2, P4 -> 4/2:
    # loads 2.25 and 1.5; 5/1 would be 1.8 and 3, 3/3 would be 3 and 1.
    assert fit_split(9, 3, 6) == (4, 2, "shortfall")
    assert fit_split(6, 2, 4) == (3, 1, "shortfall")  # loads 2 and 2


def test_fit_at_least_one_each_and_small_totals():
    assert fit_split(2, 0, 5) == (4, 1, "spare")
    assert fit_split(10, 0, 5) == (4, 1, "shortfall")
    assert fit_split(0, 10, 5)[:2] == (1, 4)
    assert fit_split(0, 0, 4)[:2] == (2, 2)  # ties alternate: balanced
    assert fit_split(5, 5, 2)[:2] == (1, 1)
    assert fit_split(2, 1, 1)[:2] == (1, 0)
    assert fit_split(1, 2, 1)[:2] == (0, 1)
    assert fit_split(1, 2, 0)[:2] == (0, 0)
    with pytest.raises(ValueError):
        fit_split(1, 1, -1)


def test_fit_minimises_the_larger_load_and_preserves_the_total():
    rng = random.Random(7)
    for _ in range(300):
        need_p, need_d, total = rng.uniform(0, 12), rng.uniform(0, 12), rng.randint(2, 14)
        p, d, _ = fit_split(need_p, need_d, total)
        assert p >= 1 and d >= 1 and p + d == total
        best = min(max(need_p / a, need_d / (total - a)) for a in range(1, total))
        assert max(need_p / p, need_d / d) == pytest.approx(best)


# -- compute_split --------------------------------------------------------------------------------

def test_compute_split_by_hand_and_detail():
    # Prefill need 2.25 (test_prefill_by_hand_linear), decode need 1.0 (test_decode_by_hand_...)
    # -> 5P/3D of 8 (test_fit_spare_goes_to_least_headroom).
    f = forecast(10, LengthDist.constant(200))
    split = compute_split(f, LINEAR, SLO_, 8, prefill_token_budget=512, max_utilisation=0.95,
                          decode_occupancy=1.0, **KV)
    assert (split.prefill, split.decode) == (5, 3)
    d = split.detail
    assert d["prefill_work_per_s"] == pytest.approx(2.0)
    assert d["prefill_capacity_rps"] == pytest.approx(40 / 9)
    assert (d["decode_c_max"], d["decode_limited_by"]) == (40, "tpot")
    assert d["decode_concurrency"] == pytest.approx(40.0)
    assert (d["prefill_need"], d["decode_need"]) == (pytest.approx(2.25), pytest.approx(1.0))
    assert (d["prefill_need_workers"], d["decode_need_workers"], d["fit"]) == (3, 1, "spare")
    assert "dopd_ratio" in d


def test_zero_rate_gives_the_mix_split_at_any_rate():
    kw = dict(prefill_token_budget=512, max_utilisation=0.95, decode_occupancy=1.0, **KV)
    zero = compute_split(forecast(0, LengthDist.constant(200)), LINEAR, SLO_, 8, **kw)
    one = compute_split(forecast(1, LengthDist.constant(200)), LINEAR, SLO_, 8, **kw)
    big = compute_split(forecast(1000, LengthDist.constant(200)), LINEAR, SLO_, 8, **kw)
    assert (zero.prefill, zero.decode) == (one.prefill, one.decode) == (big.prefill, big.decode)
    assert zero.detail["rate"] == 0 and zero.detail["planned_at_rate"] == 1.0


def test_counts_always_in_range():
    rng = random.Random(3)
    for _ in range(200):
        prompt = LengthDist(tuple(sorted(rng.randint(1, 6000) for _ in range(6))), 1.0)
        output = LengthDist(tuple(sorted(rng.randint(1, 1500) for _ in range(6))), 1.0)
        total = rng.randint(0, 10)
        s = compute_split(LoadForecast(rng.choice([0, 0.5, 5, 50, 500]), prompt, output), CONVEX,
                          SLO(rng.uniform(0.05, 3), rng.uniform(0.005, 0.1)), total,
                          kv_blocks=rng.randint(50, 5000), block_size=16, max_batch_size=rng.randint(1, 128),
                          prefill_token_budget=rng.choice([256, 2048, 8192]))
        assert s.prefill >= 0 and s.decode >= 0 and s.total == total
        if total >= 2:
            assert s.prefill >= 1 and s.decode >= 1


# -- the shipped profile ----------------------------------------------------------------------------

def test_llama3_8b_h100_long_prompts_need_more_prefill_than_chat():
    prof = load_profile("llama3-8b-h100")
    output = LengthDist((50, 100, 200, 300, 500, 800), 230)
    chat = LengthDist((100, 200, 400, 800, 1500, 3000), 600)
    long = LengthDist((2000, 3000, 4000, 5000, 6000, 7500), 4200)
    # 80 GB H100: ~444k KV tokens = 27750 blocks of 16; budget 8192 as in docker-compose.yml.
    kw = dict(kv_blocks=27750, block_size=16, max_batch_size=256, prefill_token_budget=8192)
    slo = SLO(ttft_s=0.5, tpot_s=0.05)
    for rate, total in itertools.product((5, 20, 50), (4, 8, 16)):
        c = compute_split(LoadForecast(rate, chat, output), prof, slo, total, **kw)
        lp = compute_split(LoadForecast(rate, long, output), prof, slo, total, **kw)
        assert lp.detail["prefill_need"] > 5 * c.detail["prefill_need"]
        assert lp.prefill >= c.prefill
        if total >= 8:  # 4 workers are 2P/2D for both: neither role can spare its second
            assert lp.prefill > c.prefill, (rate, total)
    # Chat is cheap to prefill (batching shares the ~10 ms forward) and decode runs full batches;
    # long prompts fill the KV pool first: 280 blocks a request, c_kv 99 < c_tpot.
    lp = compute_split(LoadForecast(20, long, output), prof, slo, 8, **kw)
    assert lp.detail["decode_limited_by"] == "kv"
    assert (lp.prefill, lp.decode) == (5, 3)


def test_decode_seats_follow_the_monotone_steps_not_a_dip_in_the_grid():
    cpu = load_profile("smollm2-cpu2")
    dec = decode_need(1.0, LengthDist.from_samples([512]), LengthDist.from_samples([2]), cpu, SLO(5.0, 0.3),
                      kv_blocks=10_000, block_size=16, max_batch_size=64)
    # At ~513 tokens the raw grid's batch 32 steps in 296 ms, but 16 already took 387 ms: 13 seats.
    assert cpu.decode_step_time(32, dec.context) < 0.3
    assert (dec.c_tpot, dec.limited_by) == (13, "tpot")
