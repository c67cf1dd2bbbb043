"""results.json assembly: the harness ceiling, status samples, seeded prompts, and the plots."""

import pytest

from common.pb import common_pb2, gateway_pb2, planner_pb2
from services.bench.metrics import RequestResult
from services.bench.outcome import RunOutcome, StatusSample
from services.bench.plots import plot_latency_cdfs, plot_timeline
from services.bench.report import build_results, harness_report
from services.bench.runner import prompt_ids, sample_from_status
from services.bench.workloads import BenchRequest


def outcome(**kw) -> RunOutcome:
    results = [RequestResult("a", 0.0, ttft=0.1, itls=[0.05], e2e=0.15, prompt_tokens=4, output_tokens=2),
               RequestResult("b", 1.0, ttft=None, ok=False, error="NOT_SENT")]
    base = dict(results=results, samples=[StatusSample(t=0.0, prefill_workers=1, decode_workers=1)], duration=2.0,
                wall_s=4.0, cpu_s=1.0, lateness=[0.001] * 99 + [0.002], sent=1, messages=3, tokens=2)
    return RunOutcome(**(base | kw))


def test_harness_report_rates_and_saturation():
    h = harness_report(outcome(), schedule_duration=10.0)
    assert h["client_cpu_utilization"] == pytest.approx(0.25)
    assert (h["messages_per_s"], h["tokens_per_s"]) == (pytest.approx(0.75), pytest.approx(0.5))
    assert h["send_lateness_p99_ms"] == pytest.approx(1.01)  # numpy: 98.01th of 100 values
    assert (h["sent"], h["not_sent"]) == (1, 1)
    assert h["saturated"] and "not sent" in h["saturation_reasons"][0]


def test_saturated_by_cpu_or_by_late_sends():
    assert not harness_report(outcome(sent=2), 10.0)["saturated"]
    cpu = harness_report(outcome(sent=2, cpu_s=3.8), 10.0)
    assert cpu["saturated"] and "CPU" in cpu["saturation_reasons"][0]
    late = harness_report(outcome(sent=2, lateness=[1.5] * 10), 10.0)  # 1.5 s > 10% of 10 s
    assert late["saturated"] and "lateness" in late["saturation_reasons"][0]


def test_build_results_has_metrics_config_harness_and_timeline():
    reqs = [BenchRequest(0.0, 4, None, 2), BenchRequest(1.0, 4, None, 2)]
    r = build_results(reqs, outcome(), {"workload": "x"}, 2.0, 200, 100)
    assert (r["completed"], r["failed"], r["config"], r["timeline"]["arrivals_per_s"]) == (1, 1, {"workload": "x"},
                                                                                          [1, 1])
    assert r["timeline"]["samples"][0]["prefill_workers"] == 1
    assert r["slo_attainment"] == 0.5 and "saturated" in r["harness"]


def test_sample_from_status_sums_per_role_over_serving_workers():
    w = lambda role, serving=True, **kw: common_pb2.WorkerInfo(role=role, serving=serving, **kw)  # noqa: E731
    status = gateway_pb2.GetStatusResponse(running_requests=7, topology=planner_pb2.Topology(workers=[
        w(common_pb2.ROLE_PREFILL, waiting_requests=2, running_requests=1),
        w(common_pb2.ROLE_PREFILL, serving=False, waiting_requests=50),
        w(common_pb2.ROLE_DECODE, waiting_requests=1, running_requests=4, kv_blocks_used=10, kv_blocks_total=100),
        w(common_pb2.ROLE_DECODE, running_requests=2, kv_blocks_used=5, kv_blocks_total=100),
    ]))
    s = sample_from_status(1.5, status)
    assert (s.t, s.prefill_workers, s.decode_workers, s.gateway_running) == (1.5, 1, 2, 7)
    assert (s.prefill_waiting, s.prefill_running, s.decode_waiting, s.decode_running) == (2, 1, 1, 6)
    assert (s.kv_blocks_used, s.kv_blocks_total) == (15, 200)


def test_prompt_ids_are_seeded_and_in_range():
    ids = prompt_ids(3, 7, 5000)
    assert len(ids) == 5000 and min(ids) >= 100 and max(ids) < 10000
    assert ids == prompt_ids(3, 7, 5000) and ids != prompt_ids(3, 8, 5000) and ids != prompt_ids(4, 7, 5000)


def test_plots_are_written(tmp_path):
    o = outcome()
    assert plot_latency_cdfs(o.results, tmp_path, 200, 100).stat().st_size > 0
    samples = [StatusSample(t=0.5 * i, prefill_workers=1, decode_workers=2, decode_running=i) for i in range(5)]
    samples.append(StatusSample(t=3.0, error="UNAVAILABLE"))
    assert plot_timeline(samples, [1, 3, 0], tmp_path).stat().st_size > 0
    assert plot_latency_cdfs([], tmp_path, None, None, name="empty.png").stat().st_size > 0


def test_peak_wall_rates_counts_tokens_per_wall_second():
    from services.bench.metrics import RequestResult
    from services.bench.report import peak_wall_rates

    # Profile time; at time scale 2 each profile second is two wall seconds.
    a = RequestResult("a", t_sent=0.0, ttft=0.1, itls=[0.1, 0.1, 0.1], e2e=0.4, output_tokens=4)
    b = RequestResult("b", t_sent=0.2, ttft=0.1, itls=[0.1], e2e=0.2, output_tokens=2)
    failed = RequestResult("c", t_sent=0.1, ttft=None, ok=False, error="UNAVAILABLE")
    # Wall arrivals: a at 0.2, 0.4, 0.6, 0.8; b at 0.6, 0.8 -> all 6 in wall second 0.
    assert peak_wall_rates([a, b, failed], time_scale=2.0) == (6, 2)
    # At time scale 4: a at 0.4, 0.8, 1.2, 1.6; b at 1.2, 1.6 -> 2 in second 0, 4 in second 1.
    assert peak_wall_rates([a, b, failed], time_scale=4.0) == (4, 2)


def test_the_harness_checks_kv_bytes_against_the_ceiling_of_the_transport_in_use():
    from services.bench.metrics import RequestResult
    from services.bench.report import KVCost, harness_report, kv_cost, peak_kv_wall_rate

    # First tokens at profile 0.1, 0.3 and 0.6 s: at time scale 2, wall seconds 0, 0 and 1.
    results = [RequestResult(n, t, ttft=0.1, e2e=0.1, prompt_tokens=p, output_tokens=1)
               for n, t, p in (("a", 0.0, 100), ("b", 0.2, 300), ("c", 0.5, 50))]
    results.append(RequestResult("d", 0.0, ttft=None, ok=False, prompt_tokens=10_000, error="UNAVAILABLE"))
    assert peak_kv_wall_rate(results, 2.0, KVCost(1000, "grpc")) == 400_000  # no prefill time: at the first token
    ceiling = {"requests_per_s": 100, "tokens_per_s": 1000, "kv_bytes_per_s": {"grpc": 700_000, "nixl": 900_000}}
    run = outcome(results=results, sent=len(results))
    by_grpc = harness_report(run, 10.0, 2.0, ceiling, KVCost(1000, "grpc"))  # 400 kB/s >= half of 700
    assert by_grpc["saturated"] and not by_grpc["under_ceiling"] and "KV by grpc" in by_grpc["saturation_reasons"][-1]
    by_nixl = harness_report(run, 10.0, 2.0, ceiling, KVCost(1000, "nixl"))  # < half of 900
    assert not by_nixl["saturated"] and by_nixl["under_ceiling"] and by_nixl["peak_kv_bytes_per_wall_s"] == 400_000
    assert harness_report(run, 10.0, 2.0, ceiling)["peak_kv_bytes_per_wall_s"] is None  # KV cost not known

    llama = kv_cost("sim:llama3-8b-h100", [["nixl", "shm"], ["nixl"]])
    assert llama == KVCost(131072, "nixl")  # 32 layers x 8 heads x 128 x K and V x 2 bytes
    assert kv_cost("sim:llama3-8b-h100", [["nixl"], []]).transport == "grpc"  # not every worker reads NIXL
    assert kv_cost("smollm2", [["nixl"]]) is None and kv_cost("sim:/no/such/profile.json", []) is None
    assert kv_cost("sim:llama3-8b-h100", [["nixl"]], "aggregated") is None  # no worker hands KV to another
    assert kv_cost("sim:llama3-8b-h100", [["nixl"]], "dopd") == llama


def test_a_prompts_kv_is_spread_over_its_prefill_before_the_first_token():
    from services.bench.metrics import RequestResult
    from services.bench.report import KVCost, peak_kv_wall_rate

    # 1000 tokens x 1000 B, prefilled in 1 s (profile) alone, first token at 2.5 s: at time scale 2
    # the bytes stream over wall [3, 5), 500 kB in each of wall seconds 3 and 4.
    one = [RequestResult("a", 0.0, ttft=2.5, e2e=2.5, prompt_tokens=1000, output_tokens=1)]
    kv = KVCost(1000, "nixl", prefill_time=lambda tokens: tokens / 1000)
    assert peak_kv_wall_rate(one, 2.0, kv) == 500_000
    # Its window straddles seconds: first token at 2.25 s -> wall [2.5, 4.5): 250, 500, 250 kB.
    late = [RequestResult("b", 0.0, ttft=2.25, e2e=2.25, prompt_tokens=1000, output_tokens=1)]
    assert peak_kv_wall_rate(late, 2.0, kv) == 500_000
    assert peak_kv_wall_rate(late + one, 2.0, kv) == 1_000_000  # wall second 3 (or 4): 500 + 500 kB
    # A TTFT shorter than the prefill alone (the profile is pessimistic): spread over the TTFT only.
    quick = [RequestResult("c", 0.0, ttft=0.5, e2e=0.5, prompt_tokens=1000, output_tokens=1)]
    assert peak_kv_wall_rate(quick, 2.0, kv) == 1_000_000  # wall [0, 1): all of it
