"""The bench harness end to end on the tiny-random cluster: a few seconds of the code workload,
and a tiny trace with a text prompt, through `run_bench` as the command line runs it."""

from __future__ import annotations

import argparse
import asyncio
import json

from services.bench.cli import add_bench_parser
from services.bench.trace import write_trace
from services.bench.workloads import BenchRequest
from tests.helpers import assert_no_leaks

METRICS = [f"{stat}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for stat in ("mean", "median", "p90", "p99")]


def parse(argv):
    parser = argparse.ArgumentParser(prog="dopd")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


async def bench(argv) -> int:
    args = parse(argv)
    # In a thread: run_bench runs its own event loop, and this test's loop is the session's.
    return await asyncio.to_thread(args.func, args)


async def test_bench_code_workload(tiny_cluster, tmp_path):
    out = tmp_path / "code"
    code = await bench(["bench", "--target", tiny_cluster.gateway, "--workload", "code", "--rate", "2",
                        "--duration", "4", "--seed", "1", "--max-context", "512", "--slo-ttft", "2000",
                        "--slo-tpot", "200", "--out", str(out), "--request-timeout", "30", "--no-progress"])
    assert code == 0
    r = json.loads((out / "results.json").read_text())
    assert r["requests"] == r["config"]["requests"] > 0
    assert r["harness"]["sent"] == r["requests"] and r["harness"]["not_sent"] == 0
    assert r["completed"] + r["failed"] == r["harness"]["sent"]
    assert r["completed"] > 0, r["errors"]
    assert all(r[k] is not None and r[k] >= 0 for k in METRICS)
    assert r["p99_ttft_ms"] >= r["median_ttft_ms"] > 0
    assert 0 <= r["slo_attainment"] <= 1 and r["goodput"] <= r["request_throughput"]
    assert r["harness"]["tokens_received"] == r["total_output_tokens"] > 0
    assert r["harness"]["output_length_mismatch"] == 0  # ignore_eos: every request produced its length
    assert {"client_cpu_utilization", "saturated", "messages_per_s", "send_lateness_p99_ms"} <= set(r["harness"])
    samples = r["timeline"]["samples"]
    assert samples and any(s["prefill_workers"] == 1 and s["decode_workers"] == 1 for s in samples)
    assert sum(r["timeline"]["arrivals_per_s"]) == r["requests"]
    lines = (out / "requests.jsonl").read_text().splitlines()
    assert len(lines) == r["requests"]
    for name in ("latency_cdf.png", "timeline.png"):
        assert (out / name).stat().st_size > 0
    await assert_no_leaks(tiny_cluster)


async def test_bench_trace_with_a_text_prompt_and_a_time_scale(tiny_cluster, tmp_path):
    trace = tmp_path / "trace.jsonl"
    write_trace(trace, [BenchRequest(0.0, 32, None, 8), BenchRequest(0.5, None, "The capital of France is", 4),
                        BenchRequest(1.0, 64, None, 1)])
    out = tmp_path / "trace"
    code = await bench(["bench", "--target", tiny_cluster.gateway, "--trace", str(trace), "--slo-ttft", "5000",
                        "--slo-tpot", "1000", "--out", str(out), "--time-scale", "0.5", "--no-progress"])
    assert code == 0
    r = json.loads((out / "results.json").read_text())
    assert (r["requests"], r["completed"], r["failed"]) == (3, 3, 0)
    assert r["total_output_tokens"] == 13
    per_request = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert per_request[1]["prompt_tokens"] > 0  # the gateway tokenized the text and said how many
    assert per_request[2]["output_tokens"] == 1 and per_request[2]["itls"] == []
    # Sent at t x 0.5 wall seconds, reported in profile time: the last request went out at ~1.0.
    assert 0.95 <= per_request[2]["t_sent"] < 1.5
    await assert_no_leaks(tiny_cluster)


async def test_bench_through_the_openai_api(tiny_cluster, tmp_path):
    """The same workload through the HTTP API (no gRPC target: no status samples)."""
    out = tmp_path / "openai"
    code = await bench(["bench", "--backend", "openai", "--base-url", tiny_cluster.cluster.http_url,
                        "--workload", "code", "--rate", "2", "--duration", "3", "--seed", "1", "--max-context", "512",
                        "--slo-ttft", "2000", "--slo-tpot", "200", "--out", str(out), "--request-timeout", "30",
                        "--no-progress"])
    assert code == 0
    r = json.loads((out / "results.json").read_text())
    assert r["config"]["backend"] == "openai" and r["config"]["model"] == "tiny-random"
    assert (r["completed"], r["failed"]) == (r["requests"], 0), r["errors"]
    assert r["harness"]["output_length_mismatch"] == 0  # the usage's count, ignore_eos honoured over HTTP
    assert r["harness"]["tokens_received"] == r["total_output_tokens"] > 0
    assert all(r[k] is not None and r[k] >= 0 for k in METRICS)
    assert r["timeline"]["samples"] == []
    await assert_no_leaks(tiny_cluster)
