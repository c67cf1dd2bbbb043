"""Core figures of DOPD serving on this machine, in one run:

1. decode   batched decode (batch 16, context 256): ModelRunner.decode over the paged KV store vs a
            plain Hugging Face forward with its DynamicCache.          target: paged/HF >= 0.8x
2. e2e      32 mixed-length requests through a local cluster (1 prefill + 1 decode worker) vs
            transformers' continuous batching in this process.         target: cluster/HF >= 2x
3. handoff  KV hand-off of ~1000-token prompts through the same cluster, from the workers'
            Prometheus metrics.                                        target: hand-off/prefill <= 10%

The cluster runs first (e2e, then hand-off), is stopped, and only then does transformers'
baseline run, so each contender has the whole machine.

    python benchmarks/bench_core.py [--only decode|e2e|handoff] [--out FILE] [--quick] [--model NAME]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks import decode_bench, e2e_bench, handoff_bench  # noqa: E402
from benchmarks.cpu import describe  # noqa: E402
from benchmarks.report import Figure, Report, at_least, at_most, console  # noqa: E402
from common.modeling.loader import load_config  # noqa: E402
from services.launcher import Cluster, ClusterSpec, free_port  # noqa: E402

DECODE_TARGET = 0.8
E2E_TARGET = 2.0
HANDOFF_TARGET = 0.10
T0 = time.perf_counter()


def log(message: str) -> None:
    console.print(f"[dim]{time.perf_counter() - T0:7.1f}s[/dim] {message}")


def section_decode(report: Report, args) -> None:
    cfg = (decode_bench.DecodeConfig(steps=4, rounds=2, warmup_steps=2) if args.quick
           else decode_bench.DecodeConfig(steps=10, rounds=3, warmup_steps=3))
    r = decode_bench.run_decode(args.model, cfg, log=log)
    report.details["decode"] = r
    s = f"decode b{cfg.batch} ctx{cfg.context}"
    steps = f"{cfg.steps * cfg.rounds} steps each, {r['torch_threads']} threads"
    report.add(Figure(s, "paged (ModelRunner.decode)", r["paged_tok_s"], "tok/s", note=steps))
    report.add(Figure(s, "HF forward + DynamicCache (sdpa)", r["hf_tok_s"], "tok/s", note=steps))
    report.add(Figure(s, "paged / HF", r["ratio"], "x", f">= {DECODE_TARGET}x", at_least(r["ratio"], DECODE_TARGET)))
    worst = min(r["cpu_per_round"], key=lambda c: c["our_cores"])
    report.add(Figure(s, "CPU in the round with the least for us", describe(worst),
                      note="other processes took CPU: a shared machine" if worst["other_cores"] > 0.1 else ""))
    report.add(Figure(s, "greedy tokens agreeing (paged vs HF)",
                      f"{r['greedy_agree_tokens']}/{r['greedy_total_tokens']}", note="sanity check, fp32"))


def _cluster_spec(args, log_dir: Path) -> ClusterSpec:
    # A redis URL nobody answers: the launcher starts (and stops) a private redis-server.
    return ClusterSpec(model=args.model, prefill=1, decode=1, port=free_port(), log_dir=log_dir,
                       redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_prefix="dopd-bench:",
                       torch_threads=args.cluster_threads,
                       extra_env={k: v for k, v in os.environ.items() if k.startswith("DOPD_")})


def section_cluster(report: Report, args, want_e2e: bool, want_handoff: bool) -> None:
    vocab = load_config(args.model).vocab_size
    workload = (e2e_bench.Workload(requests=8, prompt_min=16, prompt_max=128, output_min=4, output_max=16)
                if args.quick else e2e_bench.Workload())
    work = workload.build(vocab)
    log_dir = Path(tempfile.mkdtemp(prefix="dopd-bench-cluster-"))
    cluster = Cluster(_cluster_spec(args, log_dir))
    cluster_e2e = handoff = None
    log(f"cluster: starting {args.model}, 1 prefill + 1 decode worker, torch_threads={args.cluster_threads}, "
        f"logs in {log_dir}")
    try:
        cluster.start()
        cluster.wait_ready(900)
        log(f"cluster: ready at {cluster.gateway_address}")
        e2e_bench.warm_cluster(cluster.gateway_address, vocab)
        if want_e2e:
            log(f"e2e/cluster: {len(work)} requests, {sum(len(p) for p, _ in work)} prompt tokens, "
                f"{sum(n for _, n in work)} output tokens, all sent at once")
            pids = [p.popen.pid for p in cluster.procs] + ([cluster.redis.pid] if cluster.redis else [])
            cluster_e2e = e2e_bench.run_cluster_e2e(cluster.gateway_address, work, pids)
            log(f"e2e/cluster: {cluster_e2e['output_tokens']} tokens in {cluster_e2e['wall_s']:.1f}s; "
                f"CPU {describe(cluster_e2e['cpu'])}")
        if want_handoff:
            by_role = {p.role: p for p in cluster.procs}
            n = 1 if args.quick else 3
            prompts = [e2e_bench.Workload(requests=1, prompt_min=1000, prompt_max=1000, seed=100 + i).build(vocab)[0][0]
                       for i in range(n)]
            worker_threads = args.cluster_threads or max(1, (os.cpu_count() or 1) // 2)
            reference = handoff_bench.ReferencePrefill(args.model, len(prompts[0]), worker_threads)
            handoff = handoff_bench.run_handoff(cluster.gateway_address, by_role["prefill"].metrics_address,
                                                by_role["decode"].metrics_address, prompts, reference, log=log)
            del reference
    finally:
        codes = cluster.stop()
        log(f"cluster: stopped, exit codes {codes}")
        report.meta["cluster"] = {"log_dir": str(log_dir), "exit_codes": codes,
                                  "torch_threads_per_worker": args.cluster_threads}

    if cluster_e2e is not None:
        log("e2e/hf: transformers continuous batching on the same requests (cluster stopped)")
        hf = e2e_bench.run_hf_continuous_batching(args.model, work, log=log)
        log(f"e2e/hf: {hf['output_tokens']} tokens in {hf['wall_s']:.1f}s; CPU {describe(hf['cpu'])}")
        agree = e2e_bench.compare_outputs(cluster_e2e["outputs"], hf["outputs"])
        report.details["e2e"] = {"workload": e2e_bench.workload_dict(workload), "cluster": cluster_e2e, "hf": hf,
                                 "agreement": agree}
        s = f"e2e {workload.requests} req"
        threads = (f"{args.cluster_threads} torch threads per worker" if args.cluster_threads
                   else "torch threads: cores / workers (the launcher's default)")
        report.add(Figure(s, "cluster (1P+1D)", cluster_e2e["tok_s"], "tok/s",
                          note=f"{cluster_e2e['output_tokens']} tokens in {cluster_e2e['wall_s']:.1f}s; {threads}"))
        report.add(Figure(s, f"HF generate_batch machinery ({hf['attn_implementation']})", hf["tok_s"], "tok/s",
                          note=f"{hf['output_tokens']} tokens in {hf['wall_s']:.1f}s; per-request max_new_tokens "
                               f"via manager.add_request; {torch.get_num_threads()} threads"))
        ratio = cluster_e2e["tok_s"] / hf["tok_s"]
        report.details["e2e"]["ratio"] = ratio
        report.add(Figure(s, "cluster / HF", ratio, "x", f">= {E2E_TARGET}x", at_least(ratio, E2E_TARGET)))
        report.add(Figure(s, "exact output lengths (cluster, HF)",
                          f"{cluster_e2e['exact_lengths']}/{len(work)}, {hf['exact_lengths']}/{len(work)}"))
        report.add(Figure(s, "greedy outputs identical (cluster vs HF)",
                          f"{agree['identical_requests']}/{agree['requests']}",
                          note=f"{agree['prefix_agree_tokens']}/{agree['tokens']} tokens before first split"))
        report.add(Figure(s, "CPU during cluster run", describe(cluster_e2e["cpu"]),
                          note="ours = cluster processes + this client"))
        report.add(Figure(s, "CPU during HF run", describe(hf["cpu"])))
        report.add(Figure(s, "cluster latency p50 / p90", f"{cluster_e2e['latency']['p50_s']:.1f} / "
                          f"{cluster_e2e['latency']['p90_s']:.1f}", "s"))

    if handoff is not None:
        report.details["handoff"] = handoff
        s = f"handoff {handoff['runs'][0]['prompt_tokens']} tok"
        n = f"mean of {len(handoff['runs'])} single requests"
        report.add(Figure(s, "prefill (forward)", handoff["mean_prefill_s"], "s", note=n))
        report.add(Figure(s, "hand-off (forward end -> decode has all KV)", handoff["mean_handoff_s"] * 1e3, "ms",
                          note=f"{n}; forward end = timestamped in the thread that ran it"))
        ratio = handoff["handoff_over_prefill"]
        report.add(Figure(s, "hand-off / prefill", ratio * 100, "%", f"<= {HANDOFF_TARGET:.0%}",
                          at_most(ratio, HANDOFF_TARGET)))
        ref = handoff["mean_reference_prefill_s"]
        extra = handoff["mean_prefill_s"] + handoff["mean_handoff_s"] - ref
        report.add(Figure(s, "prefill in-process, no KV streaming (reference)", ref, "s",
                          note="ModelRunner.prefill, same prompts, each right after its cluster request"))
        report.add(Figure(s, "streaming cost: (prefill + hand-off) - reference", extra, "s",
                          note=f"{extra / ref:+.0%} vs the reference: what the worker path adds "
                               "(KV push, executor hop, sampling)"))
        report.add(Figure(s, "KV bytes", handoff["mean_kv_bytes"] / 1e6, "MB"))
        report.add(Figure(s, "KV streaming rate (approx.)", handoff["stream_mb_s"], "MB/s",
                          note="kv_bytes / (prefill + hand-off): KV streams during the forward"))
        tl = (handoff.get("polled_run") or {}).get("timeline")
        if tl:
            report.add(Figure(s, "KV streaming rate (polled)", tl["measured_stream_mb_s"], "MB/s",
                              note=f"kv_bytes / (first to last received bytes), polled every "
                                   f"{tl['poll_interval_s'] * 1e3:.0f} ms"))
            report.add(Figure(s, "KV left to send at forward end (polled, upper bound)", tl["tail_bytes"] / 1e6, "MB",
                              note=f"of {handoff['polled_run']['kv_bytes'] / 1e6:.1f} MB"))
            poll, handoff_s = tl["poll_interval_s"], handoff["polled_run"]["handoff_s"]
            if handoff_s > 4 * poll:
                report.add(Figure(s, "hand-off tail rate (polled, upper bound)", tl["tail_mb_s"], "MB/s",
                                  note="tail bytes / hand-off time"))
            else:
                report.add(Figure(s, "hand-off tail rate (polled)", None, note=(
                    f"not meaningful: hand-off {handoff_s * 1e3:.1f} ms < 4 polls of {poll * 1e3:.0f} ms")))
        else:
            note = (handoff.get("polled_run") or {}).get("timeline_note", "")
            report.add(Figure(s, "KV streaming timeline (polled)", None, note=note))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["decode", "e2e", "handoff"], help="run one section")
    p.add_argument("--out", type=Path, help="write the figures and details as JSON here")
    p.add_argument("--quick", action="store_true", help="fewer steps and requests (development)")
    p.add_argument("--model", default="smollm2", help="smollm2 (default), tiny-random or a local HF directory")
    p.add_argument("--cluster-threads", type=int, default=0,
                   help="torch threads of each cluster worker (0: the launcher's default, cores shared out)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    report = Report(meta={"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__,
                          "transformers": transformers.__version__, "torch_threads": torch.get_num_threads()})
    console.rule(f"DOPD core benchmark: {args.model}{' (quick)' if args.quick else ''}")
    if args.only in (None, "decode"):
        section_decode(report, args)
    if args.only in (None, "e2e", "handoff"):
        section_cluster(report, args, want_e2e=args.only in (None, "e2e"), want_handoff=args.only in (None, "handoff"))
    console.print(report.table())
    if args.out:
        report.dump(args.out)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
