"""The bench command line: parsing of run and sweep, argument checks before anything is sent."""

import argparse

import pytest

from services.bench.cli import add_bench_parser, build_requests, run_bench, run_config
from services.launcher import free_port

BASE = ["bench", "--target", "127.0.0.1:1", "--workload", "code", "--slo-ttft", "200", "--slo-tpot", "50"]


def parse(argv):
    parser = argparse.ArgumentParser(prog="dopd")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_run_is_the_default_mode(tmp_path):
    args = parse([*BASE, "--out", str(tmp_path), "--rate", "2", "--burstiness", "0.5", "--time-scale", "4"])
    assert (args.mode, args.rate, args.burstiness, args.time_scale, args.func) == ("run", 2.0, 0.5, 4.0, run_bench)
    assert (args.duration, args.max_context, args.request_timeout, args.seed) == (None, None, 60.0, 0)
    assert run_config(args, 2.0, "m", 60.0, 1)["max_context"] == 2048  # the workloads' default


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


AZURE = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def two_traces(tmp_path):
    """An Azure CSV (starting at 18:00:01) and a JSONL trace, each of two requests."""
    csv = tmp_path / "code.csv"
    csv.write_text(AZURE + "2023-11-16 18:00:01.0000000,100,0\n2023-11-16 18:00:03.5000000,300,7\n")
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text('{"t": 0.5, "prompt_tokens": 20, "output_tokens": 4}\n'
                     '{"t": 2.0, "prompt_tokens": 40, "output_tokens": 8}\n')
    return csv, jsonl


def test_trace_takes_several_files_and_merges_them_onto_one_clock(tmp_path):
    csv, jsonl = two_traces(tmp_path)
    args = parse(["bench", "--target", "127.0.0.1:1", "--trace", str(csv), str(jsonl), "--slo-ttft", "200",
                  "--slo-tpot", "50", "--out", str(tmp_path / "out")])
    assert args.trace == [csv, jsonl] and args.workload is None
    requests, duration = build_requests(args, None)
    # The CSV's clock starts at its first row; JSONL times are used as they are.
    assert [(r.t, r.prompt_tokens, r.output_tokens) for r in requests] == [
        (0.0, 100, 1), (0.5, 20, 4), (2.0, 40, 8), (2.5, 300, 7)]
    assert duration == 2.5
    config = run_config(args, None, "m", duration, len(requests))
    assert config["trace"] == [str(csv), str(jsonl)] and config["requests"] == 4 and config["rate"] is None
    assert config["max_context"] is None  # a trace is served as it is unless --max-context is given


def test_max_context_cuts_a_trace_prompt_first(tmp_path):
    csv, jsonl = two_traces(tmp_path)
    args = parse(["bench", "--target", "127.0.0.1:1", "--trace", str(csv), str(jsonl), "--max-context", "64",
                  "--slo-ttft", "200", "--slo-tpot", "50", "--out", str(tmp_path / "out")])
    requests, _ = build_requests(args, None)
    # 100+1 -> 63+1 and 300+7 -> 57+7 (the prompt cut first); 20+4 and 40+8 fit as they are.
    assert [(r.t, r.prompt_tokens, r.output_tokens) for r in requests] == [
        (0.0, 63, 1), (0.5, 20, 4), (2.0, 40, 8), (2.5, 57, 7)]
    assert run_config(args, None, "m", 2.5, 4)["max_context"] == 64


def test_a_merged_trace_is_rescaled_and_cut_as_one(tmp_path):
    csv, jsonl = two_traces(tmp_path)
    args = parse(["bench", "--target", "127.0.0.1:1", "--trace", str(jsonl), str(csv), "--duration", "4",
                  "--slo-ttft", "200", "--slo-tpot", "50", "--out", str(tmp_path / "out")])
    requests, duration = build_requests(args, 4.0)  # 4 requests over 2.5 s -> 4 req/s: times x 0.4
    assert [r.t for r in requests] == pytest.approx([0.0, 0.2, 0.8, 1.0]) and duration == 4.0
    assert run_config(args, 4.0, "m", duration, len(requests))["trace"] == [str(jsonl), str(csv)]
    args.duration = 0.5
    assert [r.prompt_tokens for r in build_requests(args, 4.0)[0]] == [100, 20]
