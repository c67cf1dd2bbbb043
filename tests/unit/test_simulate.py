"""`dopd simulate`: the virtual-time cluster against hand-computed times, determinism, the split
in each mode, live migration on a decode -> prefill switch, and the leak check."""

from __future__ import annotations

import argparse
import copy
import json
import random

import pytest

from common.profile import LatencyProfile, load_profile
from common.types import Role
from services.bench.workloads import BenchRequest, generate
from services.simulate.cli import add_simulate_parser
from services.simulate.cluster import Cluster
from services.simulate.events import EventLoop
from services.simulate.hardware import Link, StepTimer, default_link_gbps
from services.simulate.sim import SimConfig, simulate

# 2 layers x 2 KV heads x dim 4 x float16 x (K, V): 64 KV bytes a token.
DOC = {
    "name": "synthetic",
    "model": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 4, "dtype": "float16", "vocab_size": 100,
              "max_context": 4096},
    "prefill": {"tokens": [100, 200, 400], "seconds": [1.0, 2.0, 6.0]},
    "decode": {"batch": [1, 4], "context": [100, 300], "seconds": [[0.01, 0.03], [0.02, 0.06]]},
}
LINK_GBPS = 8e-5  # 10,000 bytes/s: a prompt of 150 tokens (9,600 bytes) takes 0.96 s, one layer 0.48 s


@pytest.fixture
def profile() -> LatencyProfile:
    return LatencyProfile.from_dict(copy.deepcopy(DOC))


def cluster(profile, prefill=1, decode=1, kv_blocks=256, link_gbps=LINK_GBPS, timeout=600.0):
    loop = EventLoop()
    return loop, Cluster(loop, profile, prefill, decode, kv_blocks=kv_blocks, block_size=16, max_batch_size=8,
                         prefill_token_budget=512, link_gbps=link_gbps, request_timeout_s=timeout)


def test_one_request_on_an_idle_cluster_takes_the_profiles_times(profile):
    loop, c = cluster(profile)
    c.submit([(0.5, 150, 4)])
    loop.run()
    assert c.leaks() == []
    (r,) = c.results()
    # TTFT: the forward (150 tokens: 1.5 s), then the last layer's KV (4,800 bytes) over the link.
    assert r.ok and r.ttft == pytest.approx(1.5 + 0.48)
    assert profile.prefill_time(150) == pytest.approx(1.5)
    # Three decode steps of a batch of one at contexts 151, 152, 153 (position + 1):
    # 0.0151, 0.0152, 0.0153 s, so TPOT is the step at the mean context, 152.
    assert r.itls == pytest.approx([0.0151, 0.0152, 0.0153])
    assert r.tpot == pytest.approx(0.0152) == pytest.approx(profile.decode_step_time(1, 152))
    assert r.output_tokens == 4 and r.e2e == pytest.approx(1.98 + 3 * 0.0152)


def test_a_slow_link_stretches_the_hand_off_to_the_whole_transfer(profile):
    loop, c = cluster(profile, link_gbps=LINK_GBPS / 10)  # 1,000 bytes/s: 9.6 s for the prompt's KV
    c.submit([(0.0, 150, 1)])
    loop.run()
    (r,) = c.results()
    # The first layer is out at 0.75 s; from then the link is busy for 9.6 s.
    assert r.ok and r.ttft == pytest.approx(0.75 + 9.6) and r.output_tokens == 1 and c.leaks() == []


def test_requests_with_no_room_are_refused_and_timeouts_free_everything(profile):
    # 12 blocks: one request of 150 + 30 tokens; the second waits in the decode queue until 0.25 s
    # before its deadline, then is refused (as the gateway does).
    loop, c = cluster(profile, kv_blocks=12, timeout=1.0)
    c.submit([(0.0, 150, 30), (0.1, 150, 30), (0.2, 10, 5000)])
    loop.run()
    assert [r.error for r in c.results()] == ["DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"]
    assert c.leaks() == []


def test_a_request_with_no_room_waits_in_the_decode_queue_and_is_served_when_room_frees(profile):
    # Room for one request at a time: the second waits, first come first served, and is placed
    # when the first finishes; nothing is refused while the deadline allows.
    loop, c = cluster(profile, kv_blocks=12, timeout=600.0)
    c.submit([(0.0, 150, 30), (0.1, 150, 30)])
    loop.run()
    first, second = c.results()
    assert first.ok and second.ok and c.leaks() == []
    assert second.ttft > first.e2e - 0.1  # it waited for the first to end
    assert c.refused == 0


def test_step_timer_is_the_profiles_decode_step_time():
    for name in ("llama3-8b-h100", "smollm2-cpu2", "zero"):
        p, timer, rng = load_profile(name), None, random.Random(0)
        timer = StepTimer(p)
        for _ in range(300):
            b, ctx = rng.randint(1, 300), rng.uniform(1, 20000)
            assert timer(b, ctx) == pytest.approx(p.decode_step_time(b, ctx), rel=1e-9, abs=1e-12)


def test_link_defaults_and_fifo():
    assert default_link_gbps(load_profile("llama3-8b-h100")) == 400.0
    assert default_link_gbps(load_profile("smollm2-cpu2")) == 8.0
    link = Link(8e-6)  # 1,000 bytes/s
    assert link.send(0.0, 1000) == pytest.approx(1.0)
    assert link.send(0.5, 500) == pytest.approx(1.5)  # queued behind the first


def _run(mode: str, profile: str = "llama3-8b-h100", workers: int = 6, rate: float = 12.0, **kw):
    reqs = generate("phase-shift", rate=rate, duration=60.0, seed=7)
    cfg = SimConfig(load_profile(profile), workers, mode=mode, predictor="ewma", **kw)
    return reqs, simulate(reqs, cfg)


def test_static_keeps_its_split_and_leaks_nothing():
    reqs, out = _run("static", split=(2, 4), kv_blocks=600, slo_ttft_s=0.5, slo_tpot_s=0.05)
    assert out.leaks == [] and out.switches == [] and out.decisions == []
    assert {(s.prefill_workers, s.decode_workers) for s in out.samples} == {(2, 4)}
    assert len(out.results) == len(reqs) and all(r.ok or r.error for r in out.results)
    assert sum(r.ok for r in out.results) > 0.9 * len(reqs)


def test_dopd_follows_a_phase_shift_and_never_empties_a_role():
    # On the CPU profile prefill is dear: the long-prompt phase wants prefill workers, the chat
    # phases decode workers.
    # The planner alone (dopd-no-policy): the policy's admission control refuses much of this
    # overload, which leaves too little prefill work to pull a worker over.
    reqs, out = _run("dopd-no-policy", "smollm2-cpu2", workers=4, rate=2.0, slo_ttft_s=2.0, slo_tpot_s=0.2,
                     link_gbps=8.0)
    assert out.leaks == [] and len(out.results) == len(reqs) and all(r.ok or r.error for r in out.results)
    assert len(out.decisions) >= 60
    tos = {s["to"] for s in out.switches}
    assert "prefill" in tos and tos & {"decode", "mixed"}
    splits = {(s.prefill_workers, s.decode_workers, s.mixed_workers) for s in out.samples}
    # Two configurations at least (switches both ways above); every one has all 4 workers, one
    # that decodes at least, and a prefill worker unless mixed workers prefill for themselves.
    assert len(splits) >= 2 and all((p >= 1 or m >= 1) and d >= 1 and p + d == 4 for p, d, m in splits)
    assert sum(s["migrated"] for s in out.switches) > 0


def test_the_same_arguments_give_the_same_results_json(tmp_path):
    parser = argparse.ArgumentParser(prog="dopd")
    add_simulate_parser(parser.add_subparsers(dest="command", required=True))
    docs = []
    for run in ("a", "b"):
        args = parser.parse_args(["simulate", "--profile", "llama3-8b-h100", "--workers", "4", "--mode", "dopd",
                                  "--workload", "phase-shift", "--rate", "8", "--duration", "20", "--seed", "3",
                                  "--slo-ttft", "500", "--slo-tpot", "50", "--predictor", "ewma", "--no-plots",
                                  "--out", str(tmp_path / run)])
        assert args.func(args) == 0
        doc = json.loads((tmp_path / run / "results.json").read_text())
        del doc["simulation"]["host"]  # wall and CPU time of this machine
        docs.append(doc)
    assert docs[0] == docs[1]
    assert docs[0]["completed"] > 0 and docs[0]["config"]["mode"] == "dopd" and docs[0]["timeline"]["samples"]


def _decoding_cluster(profile, n_requests: int, target_blocks: int):
    """1 prefill and 2 decode workers; w01 holds every request (w02 joins decode later)."""
    loop, c = cluster(profile, prefill=1, decode=2, link_gbps=8e-3)
    w01, w02 = c.by_id["w01"], c.by_id["w02"]
    w02.state.draining = True  # takes no work while the requests are placed
    c.submit([(0.01 * i, 110, 400) for i in range(n_requests)])
    loop.at(1.0, lambda: setattr(w02.state, "draining", False))
    filler = w02.pool.allocate(w02.pool.num_blocks - target_blocks)  # room for target_blocks only
    return loop, c, w01, w02, filler


def _switch_at(loop, c, t, worker, to, n_held=None):
    done = []

    def begin():
        if n_held is not None:  # every request is held there
            assert len(worker.decode.seqs) == n_held
        c.switches.begin(worker, to, done.append)

    loop.at(t, begin)
    return done


def test_decode_to_prefill_moves_every_request_and_loses_none(profile):
    # At 3 s r0 is decoding on w01; r1 and r2 (one forward of 220 tokens, 2.4 s from 1.1 s, then
    # 7 ms for the last layer's KV) still wait for their KV there, and move once it lands.
    loop, c, w01, w02, filler = _decoding_cluster(profile, 3, target_blocks=200)
    done = _switch_at(loop, c, 3.0, w01, Role.PREFILL, n_held=3)
    loop.run()
    w02.pool.free(filler)
    (sw,) = done
    assert (sw.migrated, sw.drained, w01.state.role, w01.state.switching) == (3, 0, Role.PREFILL, False)
    # Each request's KV (110 + tokens so far, 64 bytes a token) crossed a 1 MB/s link: ms, not s.
    landed = 1.1 + 2.4 + 220 * 64 / 2 / 1e6
    assert landed < 3.0 + sw.seconds < landed + 0.05 and sw.migrated_bytes >= 3 * 110 * 64
    assert max(sw.pauses) < 0.001  # only the tail: a token or two
    results = c.results()
    assert all(r.ok and r.output_tokens == 400 for r in results)
    assert all(c.by_rid[r.request_id].decode_worker is w02 for r in results)
    assert c.leaks() == []


def test_a_request_with_no_room_elsewhere_finishes_in_place(profile):
    # Each request reserves 110 + 400 - 1 tokens: 32 blocks. The target has room for one.
    loop, c, w01, w02, filler = _decoding_cluster(profile, 2, target_blocks=40)
    done = _switch_at(loop, c, 3.0, w01, Role.PREFILL, n_held=2)
    loop.run()
    (sw,) = done
    assert (sw.migrated, sw.drained) == (1, 1) and all(r.ok and r.output_tokens == 400 for r in c.results())
    assert sw.seconds > 1.0  # it waited for the other to finish here
    assert sorted(c.by_rid[r.request_id].decode_worker.worker_id for r in c.results()) == ["w01", "w02"]
    w02.pool.free(filler)
    assert c.leaks() == []


def test_prefill_to_decode_waits_for_the_prompts_in_flight(profile):
    loop, c = cluster(profile, prefill=2, decode=1)
    w00 = c.by_id["w00"]
    c.submit([(0.0, 200, 2)])  # on w00 (the tie goes to the first id): 2 s forward, then 0.64 s of KV
    done = _switch_at(loop, c, 1.0, w00, Role.DECODE)
    loop.run()
    (sw,) = done
    assert sw.seconds == pytest.approx(2.0 + 0.64 - 1.0) and w00.state.role is Role.DECODE
    assert c.results()[0].ok and c.leaks() == []


def test_the_last_worker_of_a_role_never_switches(profile):
    loop, c = cluster(profile)
    with pytest.raises(AssertionError, match="last"):
        c.switches.begin(c.by_id["w00"], Role.DECODE, lambda sw: None)


def test_text_prompts_are_refused():
    with pytest.raises(ValueError, match="prompt_tokens"):
        simulate([BenchRequest(0.0, None, "hello", 3)], SimConfig(load_profile("zero"), 2))


def test_command_line_checks(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="dopd")
    add_simulate_parser(parser.add_subparsers(dest="command", required=True))
    base = ["simulate", "--profile", "zero", "--workers", "4", "--mode", "static", "--slo-ttft", "100",
            "--slo-tpot", "10", "--out", str(tmp_path)]
    args = parser.parse_args([*base, "--trace", "a.csv", "b.jsonl", "--split", "1:3"])
    assert (args.trace[1].name, args.split, args.interval, args.kv_blocks) == ("b.jsonl", (1, 3), 1.0, 2048)
    for bad in (["--workload", "chat", "--split", "0:4"], ["--workload", "chat", "--trace", "x.jsonl"], []):
        with pytest.raises(SystemExit):
            parser.parse_args([*base, *bad])
    args = parser.parse_args([*base, "--workload", "chat", "--split", "1:2"])  # 3 != 4 workers
    assert args.func(args) == 2 and "add up to 4" in capsys.readouterr().err
