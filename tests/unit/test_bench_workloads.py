"""Workloads: the length statistics documented in services/bench/WORKLOADS.md, the context clamp,
seeding, the registry, phase-shift's phases."""

import numpy as np
import pytest

from services.bench import workloads as w
from services.bench.workloads import BenchRequest, clamp_to_context, generate

# (profile, side): (mean, median) as WORKLOADS.md documents them.
DOCUMENTED = {
    ("chat", "prompt"): (210, 100), ("chat", "output"): (198, 149),
    ("code", "prompt"): (142, 132), ("code", "output"): (123, 110),
    ("summarization", "prompt"): (5019, 4690), ("summarization", "output"): (184, 170),
    ("short-chat", "prompt"): (20, 17), ("short-chat", "output"): (59, 45),
}


@pytest.mark.parametrize("profile,side", sorted(DOCUMENTED))
def test_length_statistics_match_the_documented_ones(profile, side):
    dist = getattr(w.PROFILES[profile], side)
    x = dist.sample(np.random.default_rng(123), 100_000)
    mean, median = DOCUMENTED[(profile, side)]
    assert x.mean() == pytest.approx(mean, rel=0.03)
    assert np.median(x) == pytest.approx(median, rel=0.03, abs=1)
    assert x.min() >= dist.lo and x.max() <= dist.hi


@pytest.mark.parametrize("name,mean_prompt,mean_output", [
    ("chat", 210, 198), ("code", 142, 123), ("summarization", 5019, 184), ("mix", 914, 177)])
def test_workloads_carry_their_profiles_lengths(name, mean_prompt, mean_output):
    reqs = generate(name, rate=20, duration=500, seed=5, max_context=100_000)
    assert np.mean([r.prompt_tokens for r in reqs]) == pytest.approx(mean_prompt, rel=0.06)
    assert np.mean([r.output_tokens for r in reqs]) == pytest.approx(mean_output, rel=0.06)
    assert len(reqs) == pytest.approx(20 * 500, rel=0.05)


@pytest.mark.parametrize("name", sorted(w.WORKLOADS))
def test_every_workload_fits_the_context_is_ordered_and_seeded(name):
    reqs = generate(name, rate=3, duration=60, seed=9, burstiness=0.5, max_context=512)
    assert reqs, name
    assert all(r.prompt_tokens + r.output_tokens <= 512 for r in reqs)
    assert all(r.prompt is None and r.prompt_tokens >= 1 and r.output_tokens >= 1 for r in reqs)
    assert [r.t for r in reqs] == sorted(r.t for r in reqs) and all(0 <= r.t < 60 for r in reqs)
    assert reqs == generate(name, rate=3, duration=60, seed=9, burstiness=0.5, max_context=512)
    assert reqs != generate(name, rate=3, duration=60, seed=10, burstiness=0.5, max_context=512)


def test_a_higher_rate_sends_the_same_requests_and_more():
    low = generate("mix", rate=2, duration=100, seed=1)
    high = generate("mix", rate=8, duration=100, seed=1)
    assert len(high) > len(low) > 100
    lengths = lambda reqs: [(r.prompt_tokens, r.output_tokens) for r in reqs]  # noqa: E731
    assert lengths(high)[:len(low)] == lengths(low)


@pytest.mark.parametrize("prompt,output,ctx,expected", [
    (100, 50, 2048, (100, 50)),     # fits
    (2000, 100, 2048, (1948, 100)),  # the prompt is cut first
    (100, 1500, 1024, (100, 512)),   # an output over half the context is cut to half of it
    (900, 900, 1024, (512, 512)),
    (5, 5, 2, (1, 1)),
])
def test_clamp_to_context(prompt, output, ctx, expected):
    assert clamp_to_context(prompt, output, ctx) == expected
    p, o = expected
    assert p + o <= ctx


def test_clamp_refuses_a_context_too_small():
    with pytest.raises(ValueError):
        clamp_to_context(1, 1, 1)


def test_phase_shift_phases():
    rate, duration = 4.0, 1000.0
    reqs = generate("phase-shift", rate=rate, duration=duration, seed=2, max_context=100_000)
    phases = w.phase_rates(rate, duration)
    by_phase = [[r for r in reqs if p.start <= r.t < p.end] for p in phases]
    for p, got in zip(phases, by_phase, strict=True):
        assert len(got) == pytest.approx(p.rate * (p.end - p.start), rel=0.15)
    quiet, burst, surge, tail = by_phase
    assert min(r.prompt_tokens for r in burst) >= 1500  # long prompts only
    assert np.mean([r.prompt_tokens for r in surge]) < 40  # short chat
    assert surge and len(surge) / 300 > 2.5 * len(quiet) / 200  # the surge's rate is far above the quiet one
    gaps = np.diff([r.t for r in tail])
    assert np.var(gaps) / np.mean(gaps) ** 2 > 2.5  # bursty tail: CV^2 ~ 1/0.25
    assert phases[3].burstiness == 0.25 and w.phase_rates(rate, duration, 0.1)[3].burstiness == 0.1


def test_registry_takes_new_workloads_and_refuses_unknown_ones():
    @w.register("test-fixed")
    def fixed(rate, duration, seed=0, burstiness=1.0, max_context=2048):
        return [BenchRequest(1.0, 5, None, 2), BenchRequest(0.5, 3, None, 1)]

    try:
        assert [r.t for r in generate("test-fixed", 1, 1)] == [0.5, 1.0]
    finally:
        del w.WORKLOADS["test-fixed"]
    with pytest.raises(ValueError, match="unknown workload"):
        generate("nope", 1, 1)


@pytest.mark.parametrize("kw", [dict(prompt_tokens=None, prompt=None), dict(prompt_tokens=3, prompt="x"),
                                dict(prompt_tokens=0, prompt=None), dict(prompt_tokens=3, prompt=None, output_tokens=0),
                                dict(prompt_tokens=3, prompt=None, t=-1.0)])
def test_bench_request_validation(kw):
    args = dict(t=0.0, output_tokens=1) | kw
    with pytest.raises(ValueError):
        BenchRequest(**args)
