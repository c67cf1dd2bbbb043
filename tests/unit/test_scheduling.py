"""DOPD's request scheduling policy, the pure core (services/gateway/scheduling.py)."""

from __future__ import annotations

import pytest

from common.load import SLO, LengthDist, LoadForecast
from common.profile import load_profile
from services.gateway.scheduling import (
    DecodeCandidate,
    Path,
    PrefillLedger,
    SchedulingPolicy,
    ShortBatcher,
    saturating_prompt,
)

PROFILE = load_profile("llama3-8b-h100")
SLO_ = SLO(ttft_s=0.3, tpot_s=0.04)


def forecast(prompts: list[int], rate: float = 20.0, output: int = 200) -> LoadForecast:
    return LoadForecast(rate, LengthDist.from_samples(prompts), LengthDist.from_samples([output] * 10))


def policy(prompts: list[int], **kw) -> SchedulingPolicy:
    return SchedulingPolicy.for_forecast(forecast(prompts, **kw), PROFILE, SLO_, batch_token_cap=8192,
                                         typical_decode_batch=64)


def test_thresholds_follow_the_forecast_not_constants():
    chat = policy([20, 40, 60, 100, 200, 400, 800])
    documents = policy([2000, 3000, 4000, 5000, 6000, 8000])
    assert chat.long_above == pytest.approx(231.4, abs=0.1)  # the predicted mean prompt
    # Documents: the predicted mean is ~4.7k, but from 2048 tokens a prompt uses the H100 well
    # alone (within 10% of the cheapest cost a token): never held for company. (1024 on
    # llama3-8b-h100-v1, whose prefill cost a token flattened out sooner.)
    assert saturating_prompt(PROFILE) == 2048 == documents.long_above
    assert saturating_prompt(load_profile("llama3-8b-h100-v1")) == 1024
    assert saturating_prompt(load_profile("smollm2-cpu2")) == 256
    assert chat.path(1000) is Path.LONG and documents.path(1000) is Path.SHORT
    assert documents.path(2048) is Path.SHORT and documents.path(4000) is Path.LONG
    # Ultra-short: among the shortest predicted, and only while a decode step has slack for it.
    assert 0 < chat.ultra_short_up_to <= chat.long_above and chat.path(20) is Path.ULTRA_SHORT
    assert documents.ultra_short_up_to > chat.ultra_short_up_to
    tight = SchedulingPolicy.for_forecast(forecast([20, 40, 60]), PROFILE, SLO(0.3, 0.005), 8192, 64)
    assert tight.ultra_short_up_to == 0 and tight.path(1) is Path.SHORT  # no slack: no prefill on decode


def test_the_batch_wait_cap_shrinks_as_arrivals_fill_batches_sooner():
    slow, busy = policy([100] * 10, rate=1.0), policy([100] * 10, rate=10_000.0)
    assert slow.batch_wait_cap_s == pytest.approx(0.2 * SLO_.ttft_s)  # capped by its share of the SLO
    assert busy.batch_wait_cap_s == pytest.approx(8192 / (10_000 * 100))  # a batch fills in 8 ms


def test_decode_goes_to_the_smallest_batch_with_room():
    # (The prefill worker is routing.pick_prefill's, tested in test_routing.py.)
    p = policy([100, 200, 300])
    decode = [DecodeCandidate("d0", free_blocks=100, block_size=16, batch_size=40),
              DecodeCandidate("d1", free_blocks=10, block_size=16, batch_size=2),  # 160 tokens: too few
              DecodeCandidate("d2", free_blocks=50, block_size=16, batch_size=40),
              DecodeCandidate("d3", free_blocks=20, block_size=16, batch_size=5)]
    assert [c.worker_id for c in p.decode_workers(decode, kv_tokens=300)] == ["d3", "d0", "d2"]


def test_admission_refuses_what_would_miss_the_ttft_slo_and_says_why():
    p = policy([100, 200, 300], rate=5.0)
    assert p.refusal(500, Path.LONG, queued_tokens=0) is None
    why = p.refusal(500, Path.LONG, queued_tokens=200_000)  # seconds of prefill queued ahead
    assert why is not None and "predicted time to first token" in why and "300 ms SLO" in why
    off = SchedulingPolicy.for_forecast(forecast([100]), PROFILE, SLO_, 8192, 64, admission=False)
    assert off.refusal(500, Path.LONG, queued_tokens=200_000) is None
    # A short prompt waits for a batch only when every prefill worker is busy.
    assert p.predicted_ttft(100, Path.SHORT, 0) == pytest.approx(p.predicted_ttft(100, Path.LONG, 0))
    assert p.predicted_ttft(100, Path.SHORT, 50) == pytest.approx(p.predicted_ttft(100, Path.LONG, 50)
                                                                  + p.batch_wait_cap_s)
    # The queued work and the prompt are one batched forward, not two.
    assert p.predicted_ttft(500, Path.LONG, 4000) == pytest.approx(PROFILE.prefill_time(4500))


def test_short_batches_leave_at_the_token_cap_or_the_wait_cap():
    batcher = ShortBatcher(token_cap=100, wait_cap_s=0.05)
    assert batcher.add("a", 40, now=0.0) is None and batcher.due() == pytest.approx(0.05)
    assert batcher.add("b", 40, now=0.01) is None
    assert batcher.add("c", 30, now=0.02) == ["a", "b"]  # with c, 110 tokens: past the cap; c waits
    assert len(batcher) == 1 and batcher.due() == pytest.approx(0.07)
    assert batcher.add("c2", 70, now=0.03) == ["c", "c2"]  # exactly the cap
    assert len(batcher) == 0 and batcher.due() is None
    batcher.add("d", 10, now=1.0)
    batcher.add("e", 10, now=1.03)
    assert batcher.poll(1.049) is None
    assert batcher.remove("d") and not batcher.remove("d")  # its client went away
    assert batcher.poll(1.05) is None  # the oldest is now e: its cap ends at 1.08
    assert batcher.poll(1.08) == ["e"]
    batcher.add("f", 10, now=2.0)
    assert batcher.flush() == ["f"] and batcher.flush() == []  # a prefill worker freed


def test_the_ledger_knows_each_workers_outstanding_work_and_since_when_it_is_busy():
    ledger = PrefillLedger()
    assert ledger.least_loaded(["p0", "p1"], now=5.0) == (0, 0.0) and ledger.empty()
    ledger.sent("p0", "a", 4000, now=1.0)
    ledger.sent("p0", "b", 1000, now=2.0)
    ledger.sent("p1", "c", 6000, now=3.0)
    assert ledger.least_loaded(["p0", "p1"], now=4.0) == (5000, 3.0)  # p0 busy since a was sent
    ledger.done("p0", "a", finished_at=3.5)
    # b was sent at 2.0, but until 3.5 p0 was busy with a: it has worked on b for 0.5 s at most.
    assert ledger.least_loaded(["p0", "p1"], now=4.0) == (1000, 0.5)
    ledger.sent("p0", "d", 10, now=4.5)
    ledger.done("p0", "d")  # withdrawn (its client went away): says nothing of p0's progress
    assert ledger.busy_s("p0", now=5.0) == 1.5
    ledger.done("p0", "b", finished_at=5.0)
    ledger.sent("p0", "e", 100, now=6.0)
    assert ledger.busy_s("p0", now=6.5) == 0.5  # idle after b: busy since e was sent
    ledger.done("p0", "e")
    ledger.done("p1", "c")
    assert ledger.empty()
    # Admission takes off what the worker has done already, never below the prompt's own prefill.
    p = policy([100, 200, 300])
    full = p.predicted_ttft(500, Path.LONG, queued_tokens=8000)
    assert p.predicted_ttft(500, Path.LONG, 8000, busy_s=0.1) == pytest.approx(full - 0.1)
    assert p.predicted_ttft(500, Path.LONG, 8000, busy_s=99.0) == pytest.approx(PROFILE.prefill_time(500))


def test_a_decode_worker_seats_requests_while_its_step_stays_within_the_tpot_slo():
    cpu = load_profile("smollm2-cpu2")
    p = SchedulingPolicy.for_forecast(forecast([100]), cpu, SLO(5.0, 0.3), 512, 1)

    def worker(wid: str, batch: int, context: float) -> DecodeCandidate:
        return DecodeCandidate(wid, free_blocks=1000, block_size=16, batch_size=batch, context_tokens=batch * context)

    # At 512 tokens a step of 13 takes 288 ms, of 14 321 ms: 13 seats under a 300-ms TPOT SLO.
    assert p.has_seat(worker("d", 12, 512), 512) and not p.has_seat(worker("d", 13, 512), 512)
    # The grid, measured under load, dips at batch 32 (296 ms at 512 tokens, under 16's 387 ms):
    # a dip never seats what a smaller batch could not.
    assert cpu.decode_step_time(32, 512) < 0.3 and not p.has_seat(worker("d", 31, 512), 512)
    # Longer contexts, fewer seats (10 at 1024 tokens); the batch's mean context counts the newcomer.
    assert p.has_seat(worker("d", 9, 1024), 1024) and not p.has_seat(worker("d", 10, 1024), 1024)
    assert not p.has_seat(worker("d", 12, 512), 4000)
    # An idle worker always takes one; without admission control nothing is limited.
    assert p.has_seat(worker("d", 0, 0), 8000)
    off = SchedulingPolicy.for_forecast(forecast([100]), cpu, SLO(5.0, 0.3), 512, 1, admission=False)
    assert off.has_seat(worker("d", 200, 1024), 1024)
    # decode_workers leaves the seatless out, whatever their free blocks.
    order = p.decode_workers([worker("full", 13, 512), worker("ok", 12, 512), worker("idle", 0, 0)], 100, 512)
    assert [c.worker_id for c in order] == ["idle", "ok"]


def test_the_seat_limit_a_worker_enforces_is_the_batch_that_has_seat_allows():
    """SchedulingPolicy.seat_limit: what the decode worker is sent (DecodeRequest.max_seats) to
    refuse past, whoever's requests fill it: the largest batch, at the mean context per seat this
    gateway sees, that steps within the TPOT SLO."""
    cpu = load_profile("smollm2-cpu2")
    p = SchedulingPolicy.for_forecast(forecast([100]), cpu, SLO(5.0, 0.3), 512, 1)

    def worker(batch: int, context: float) -> DecodeCandidate:
        return DecodeCandidate("d", free_blocks=1000, block_size=16, batch_size=batch, context_tokens=batch * context)

    for batch, context in ((0, 512), (5, 512), (12, 512), (3, 1024), (9, 1024)):
        limit = p.seat_limit(worker(batch, context), context)
        assert p.has_seat(worker(limit - 1, context), context) and not p.has_seat(worker(limit, context), context)
    assert p.seat_limit(worker(4, 512), 512) == 13 and p.seat_limit(worker(4, 1024), 1024) == 10
    assert p.seat_limit(worker(0, 0), 10**6) == 1  # one alone is always served, however slow
    off = SchedulingPolicy.for_forecast(forecast([100]), cpu, SLO(5.0, 0.3), 512, 1, admission=False)
    assert off.seat_limit(worker(4, 512), 512) == 0  # no limit


def test_batch_monotone_steps_never_fall_as_the_batch_grows():
    cpu = load_profile("smollm2-cpu2")
    steps = cpu.batch_monotone()
    for context in (128, 300, 512, 1024):
        times = [steps.decode_step_time(b, context) for b in range(1, 65)]
        assert times == sorted(times)
        assert all(t >= cpu.decode_step_time(b, context) for b, t in enumerate(times, 1) if b <= 32)
    assert PROFILE.batch_monotone() == PROFILE  # a grid already monotone is kept as it is


def test_the_wait_for_a_seat_is_predicted_from_how_fast_the_batches_free_theirs():
    cpu = load_profile("smollm2-cpu2")
    p = SchedulingPolicy.for_forecast(forecast([100], output=50), cpu, SLO(5.0, 0.3), 512, 1)
    assert p.mean_output == 50
    steps = cpu.batch_monotone()
    full = [DecodeCandidate("a", 1000, 16, 13, 13 * 512.0), DecodeCandidate("b", 1000, 16, 10, 10 * 1024.0)]
    # Each request holds its seat for 50 steps: a frees 13 / (50 x its step) seats a second, b 10 / (...).
    rate = 13 / (50 * steps.decode_step_time(13, 512)) + 10 / (50 * steps.decode_step_time(10, 1024))
    assert p.seat_wait_s(full, ahead=0) == pytest.approx(1 / rate)
    assert p.seat_wait_s(full, ahead=4) == pytest.approx(5 / rate)  # behind 4 others: the 5th seat
    assert p.seat_wait_s([DecodeCandidate("idle", 1000, 16, 0, 0.0)], ahead=0) == 0.0
    # Where the gateway knows what each holder has left, the seats free as those finish, soonest
    # first; past them, at the steady rate.
    known = [DecodeCandidate("a", 1000, 16, 2, 2 * 512.0, tokens_left=(30, 4)),
             DecodeCandidate("b", 1000, 16, 1, 1024.0, tokens_left=(10,))]
    step_a, step_b = steps.decode_step_time(2, 512), steps.decode_step_time(1, 1024)
    assert [p.seat_wait_s(known, ahead=k) for k in range(3)] == pytest.approx([4 * step_a, 10 * step_b, 30 * step_a])
    steady = 2 / (50 * step_a) + 1 / (50 * step_b)
    assert p.seat_wait_s(known, ahead=4) == pytest.approx(30 * step_a + 2 / steady)
