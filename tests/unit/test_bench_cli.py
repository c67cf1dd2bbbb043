"""The bench command line: parsing of run and sweep, argument checks before anything is sent."""

import argparse

import pytest

from services.bench.cli import add_bench_parser, run_bench
from services.launcher import free_port

BASE = ["bench", "--target", "127.0.0.1:1", "--workload", "code", "--slo-ttft", "200", "--slo-tpot", "50"]


def parse(argv):
    parser = argparse.ArgumentParser(prog="dopd")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_run_is_the_default_mode(tmp_path):
    args = parse([*BASE, "--out", str(tmp_path), "--rate", "2", "--burstiness", "0.5", "--time-scale", "4"])
    assert (args.mode, args.rate, args.burstiness, args.time_scale, args.func) == ("run", 2.0, 0.5, 4.0, run_bench)
    assert (args.duration, args.max_context, args.request_timeout, args.seed) == (None, 2048, 60.0, 0)


def test_sweep_mode_and_its_rates(tmp_path):
    args = parse(["bench", "sweep", *BASE[1:], "--out", str(tmp_path), "--rates", "0.5, 1,2"])
    assert (args.mode, args.rates) == ("sweep", [0.5, 1.0, 2.0])


@pytest.mark.parametrize("extra", [["--trace", "x.jsonl"], ["--rates", "1,-2"], ["--rates", "a"]])
def test_bad_arguments_are_refused_by_the_parser(extra, tmp_path):
    with pytest.raises(SystemExit):
        parse([*BASE, "--out", str(tmp_path), *extra])


def test_required_arguments():
    with pytest.raises(SystemExit):
        parse(BASE)  # no --out


def test_sweep_options_outside_sweep_and_a_sweep_without_rates_are_refused(tmp_path):
    assert run_bench(parse([*BASE, "--out", str(tmp_path), "--rates", "1,2"])) == 2
    assert run_bench(parse(["bench", "sweep", *BASE[1:], "--out", str(tmp_path)])) == 2


def test_an_unreachable_gateway_is_an_error_not_a_run(tmp_path):
    args = parse(["bench", *BASE[1:], "--out", str(tmp_path / "out")])
    args.target = f"127.0.0.1:{free_port()}"
    assert run_bench(args) == 1
    assert not (tmp_path / "out").exists()
