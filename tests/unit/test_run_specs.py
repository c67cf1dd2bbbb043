"""`dopd simulate` and `dopd bench` as library calls (services/simulate/api.py, services/bench/api.py):
the typed specs the command lines and `dopd bench compare` build, and a run through the call
giving what the command writes."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest

from services.bench.api import BenchSpec, bench_once
from services.bench.cli import add_bench_parser, bench_spec
from services.bench.sources import RequestSource, build_requests, max_context_of, source_of
from services.comparison import compare_runs
from services.comparison.arguments import add_compare_arguments
from services.launcher import free_port
from services.simulate.api import SimulateSpec, save, simulate_run
from services.simulate.cli import add_simulate_parser, simulate_spec

SLOS = ["--slo-ttft", "300", "--slo-tpot", "40"]


def parse_simulate(argv):
    parser = argparse.ArgumentParser(prog="dopd")
    add_simulate_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["simulate", *argv])


def parse_bench(argv):
    parser = argparse.ArgumentParser(prog="dopd")
    add_bench_parser(parser.add_subparsers(dest="command", required=True), compare=(add_compare_arguments, None))
    return parser.parse_args(["bench", *argv])


def test_a_source_is_a_workload_or_traces_and_takes_numbers_as_the_parsers_do():
    with pytest.raises(ValueError):
        RequestSource()
    with pytest.raises(ValueError):
        RequestSource(workload="mix", trace=(Path("a.jsonl"),))
    args = argparse.Namespace(workload="mix", trace=None, rate=2, duration=10, burstiness=1, seed=3,
                              max_context=None)
    source = source_of(args)
    assert source == RequestSource(workload="mix", rate=2.0, duration=10.0, seed=3)
    assert isinstance(source.rate, float) and source.until is None and max_context_of(source) == 2048
    requests, duration = build_requests(source)
    assert duration == 10.0 and requests and all(r.t < 10.0 for r in requests)
    prefix, until = build_requests(replace(source, until=4.0))
    assert until == 4.0 and prefix == [r for r in requests if r.t < 4.0]


def test_the_simulate_call_gives_what_the_command_writes(tmp_path):
    argv = ["--profile", "llama3-8b-h100", "--workers", "3", "--mode", "dopd", "--workload", "mix", "--rate", "4",
            "--duration", "6", "--seed", "2", *SLOS, "--slo-itl", "150", "--predictor", "ewma", "--no-plots",
            "--write-requests", "--out", str(tmp_path / "cli")]
    args = parse_simulate(argv)
    assert args.func(args) == 0
    spec = SimulateSpec(profile="llama3-8b-h100", workers=3, mode="dopd", slo_ttft_ms=300, slo_tpot_ms=40,
                        slo_itl_ms=150, predictor="ewma",
                        source=RequestSource(workload="mix", rate=4.0, duration=6.0, seed=2))
    assert simulate_spec(args) == spec  # the parser's defaults are the spec's
    result = simulate_run(spec)
    save(result, tmp_path / "api", write_requests=True)
    written = json.loads((tmp_path / "cli" / "results.json").read_text())
    ours = json.loads((tmp_path / "api" / "results.json").read_text())
    for doc in (written, ours):
        del doc["simulation"]["host"]  # wall and CPU time of this machine
    assert ours == written and result.results["completed"] == written["completed"] > 0
    assert (tmp_path / "api" / "requests.jsonl").read_text() == (tmp_path / "cli" / "requests.jsonl").read_text()
    assert len(result.requests) == written["requests"] and result.samples and result.cfg.workers == 3


def test_a_spec_is_checked_as_the_command_checks_it():
    source = RequestSource(workload="mix")
    with pytest.raises(ValueError, match="predictor"):
        SimulateSpec(profile="zero", workers=4, mode="dopd", source=source, slo_ttft_ms=1, slo_tpot_ms=1,
                     predictor="nope")
    with pytest.raises(ValueError, match="add up to 4"):
        simulate_run(SimulateSpec(profile="zero", workers=4, mode="static", split=(1, 2), source=source,
                                  slo_ttft_ms=1, slo_tpot_ms=1))


@pytest.mark.parametrize("extra", [[], ["--kv-blocks", "1000", "--chunk-tokens", "512", "--predictor", "ewma",
                                        "--decode-queue-limit", "0", "--slo-itl", "150", "--max-context", "4096"]])
def test_compare_runs_the_simulator_with_what_dopd_simulate_would_take(extra, tmp_path):
    # What the comparison used to pass on as `dopd simulate`'s command line, and the spec it builds now.
    cargs = parse_bench(["compare", "--engine", "des", "--profile", "llama3-8b-h100", "--workers", "4",
                         "--workload", "phase-shift", "--rate", "6", "--duration", "10", "--burstiness", "0.5",
                         *SLOS, "--request-timeout", "30", "--out", str(tmp_path), *extra])
    sargs = parse_simulate(["--profile", "llama3-8b-h100", "--workers", "4", "--mode", "static", "--split", "1:3",
                            "--workload", "phase-shift", "--rate", "6", "--duration", "10", "--burstiness", "0.5",
                            "--seed", "0", "--request-timeout", "30", *SLOS, "--out", str(tmp_path), *extra])
    assert compare_runs.des_spec(cargs, "static", (1, 3)) == simulate_spec(sargs)
    cargs.until = 2.5  # static-apriori's fit: the first part of the schedule
    assert compare_runs.des_spec(cargs, "static", (1, 3)).source.until == 2.5


def test_compare_benches_a_cluster_as_dopd_bench_would(tmp_path, monkeypatch):
    monkeypatch.delenv("DOPD_API_KEY", raising=False)
    cargs = parse_bench(["compare", "--engine", "sim", "--profile", "llama3-8b-h100", "--workers", "2",
                         "--workload", "mix", "--rate", "2", "--duration", "2", "--time-scale", "4", *SLOS,
                         "--slo-itl", "150", "--out", str(tmp_path)])
    bargs = parse_bench(["--target", "127.0.0.1:9", "--workload", "mix", "--rate", "2", "--duration", "2",
                         "--burstiness", "1.0", "--seed", "0", "--request-timeout", "60.0", *SLOS, "--slo-itl", "150",
                         "--time-scale", "4", "--out", str(tmp_path / "run"), "--no-progress"])
    assert compare_runs.bench_spec(cargs, "127.0.0.1:9", tmp_path / "run") == bench_spec(bargs)


def test_bench_once_against_no_gateway_is_exit_1_and_writes_nothing(tmp_path, capsys):
    spec = BenchSpec(source=RequestSource(workload="mix", duration=1.0), slo_ttft_ms=300, slo_tpot_ms=40,
                     out=tmp_path / "out", target=f"127.0.0.1:{free_port()}", progress=False)
    assert bench_once(spec) == (1, None)
    assert "error: gateway" in capsys.readouterr().err and not (tmp_path / "out").exists()
