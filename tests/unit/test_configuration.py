"""The configuration core's capacity model (services/planner/configuration.py): what each split and
each aggregation budget is predicted to carry within the SLOs. benchmarks/bench_configuration.py
holds the model against the rates the simulator measured."""

from __future__ import annotations

import pytest

from common.load import SLO, LengthDist, LoadForecast
from common.profile import load_profile
from services.planner.configuration import aggregated_capacity, rank_configurations, split_capacity
from services.planner.core import PoolShape

PROFILE = load_profile("llama3-8b-h100")
SHAPE = PoolShape(kv_blocks=4096, block_size=16, max_batch_size=256, prefill_token_budget=8192)
CHAT = LoadForecast(10.0, LengthDist.from_samples([100, 200, 400, 800, 1500] * 20),
                    LengthDist.from_samples([50, 100, 200, 300] * 25), "test")
LOOSE = SLO(1.0, 0.050)


def test_a_split_carries_in_proportion_to_its_workers():
    one = split_capacity(CHAT, PROFILE, LOOSE, 2, 3, SHAPE)
    two = split_capacity(CHAT, PROFILE, LOOSE, 4, 6, SHAPE)
    assert one.rate > 0 and two.rate == pytest.approx(2 * one.rate)
    assert one.limited_by in ("prefill", "decode")
    assert split_capacity(CHAT, PROFILE, SLO(0.001, 0.050), 2, 3, SHAPE).limited_by == "ttft"


def test_aggregation_carries_in_proportion_to_its_workers_and_stops_at_its_limit():
    four = aggregated_capacity(CHAT, PROFILE, LOOSE, 4, 2048, SHAPE)
    eight = aggregated_capacity(CHAT, PROFILE, LOOSE, 8, 2048, SHAPE)
    assert four.rate > 0 and eight.rate == pytest.approx(2 * four.rate, rel=1e-6)
    assert four.limited_by in ("tpot", "kv", "batch", "ttft", "budget")
    # A tighter TPOT leaves less room beside the chunks.
    assert aggregated_capacity(CHAT, PROFILE, SLO(1.0, 0.015), 4, 2048, SHAPE).rate < four.rate


def test_a_stall_slo_rules_out_big_chunks_not_small_ones():
    full_2048 = PROFILE.mixed_step_time(64, 500, 2048)
    stall = SLO(1.0, 0.050, itl_s=full_2048 * 0.8)
    big = aggregated_capacity(CHAT, PROFILE, stall, 4, 8192, SHAPE)
    small = aggregated_capacity(CHAT, PROFILE, stall, 4, 512, SHAPE)
    assert big.limited_by == "stall" and big.rate < small.rate
    assert small.rate > 0


def test_every_configuration_ranked_best_first():
    ranked = rank_configurations(CHAT, PROFILE, LOOSE, 5, SHAPE)
    names = [c.name for c in ranked]
    assert sorted(names) == sorted([f"split {p}:{5 - p}" for p in range(1, 5)]
                                   + ["aggregated 512", "aggregated 2048", "aggregated 8192"])
    rates = [c.rate for c in ranked]
    assert rates == sorted(rates, reverse=True)
