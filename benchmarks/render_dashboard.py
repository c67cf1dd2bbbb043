"""Render the Grafana dashboard from a real run, end to end: a simulated GPU cluster whose planner
switches roles, scraped by a real Prometheus, then `dopd dashboard` to PNG.

    python benchmarks/render_dashboard.py --out docs/results/dashboard

1. `dopd up --engine sim` (the real services; forward passes timed by a latency profile) in dopd
   mode: the dynamic planner switches roles in place, live-migrating running requests;
2. `prometheus` (the Debian package) scraping every service's metrics port each second, with its
   storage under --work;
3. `dopd bench` runs a seeded workload (phase-shift: quiet chat, a burst of long prompts, a surge
   of short chat, a bursty tail, so that the best split moves);
4. `dopd dashboard` renders every panel of deploy/grafana/dashboards/dopd.json over the run;
5. OUT/README.md records the commands as they ran and the run's figures.

Each command runs as a child process, exactly as printed. Needs prometheus on the PATH
(`make install`). About 8 minutes on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.launcher import free_port  # noqa: E402

PY = [sys.executable, "-m"]


def shown(argv: list[str]) -> str:
    """A command as a person types it: `dopd ...` for the CLI, paths relative to the repository."""
    words = [shlex.quote(str(a).replace(str(ROOT) + "/", "")) for a in argv]
    if words[:3] == [sys.executable, "-m", "services.cli"]:
        words = ["dopd", *words[3:]]
    elif words[:3] == [sys.executable, "-m", "services.dashboard"]:
        words = ["dopd", "dashboard", *words[3:]]
    return " ".join(words)


def wait_ready(up: subprocess.Popen, timeout: float) -> str:
    """The gateway address `dopd up` prints when the cluster is ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = up.stdout.readline()
        if not line:
            raise RuntimeError(f"dopd up exited with {up.wait()}")
        if line.startswith("gateway ready at "):
            return line.split()[-1]
    raise TimeoutError("the cluster was not ready in time")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where the PNGs and README.md go")
    parser.add_argument("--work", type=Path, help="logs, Prometheus' storage, bench results (default /tmp/...)")
    parser.add_argument("--profile", default="llama3-8b-h100")
    # One prefill worker at the start, as the quiet first phase wants.
    parser.add_argument("--prefill", type=int, default=1)
    parser.add_argument("--decode", type=int, default=3)
    parser.add_argument("--time-scale", type=float, default=10.0)
    parser.add_argument("--kv-blocks", type=int, default=4096)
    parser.add_argument("--workload", default="phase-shift")
    # phase-shift at 16 req/s (profile time): the long-prompt burst wants 3 prefill workers of 4, the
    # quiet start and the short-chat surge one (services/planner/split.py), so the split moves both ways.
    parser.add_argument("--rate", type=float, default=16.0)
    parser.add_argument("--burstiness", type=float, default=0.5)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals, profile time")
    parser.add_argument("--slo-ttft", type=float, default=300.0)
    parser.add_argument("--slo-tpot", type=float, default=40.0)
    parser.add_argument("--step", type=float, default=5.0, help="seconds between rendered points")
    args = parser.parse_args()
    # Stopped (Ctrl-C, or SIGTERM, or SIGINT from a shell that started us in the background and
    # so ignores it): take down Prometheus and the cluster on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)

    prometheus = shutil.which("prometheus")
    if prometheus is None:
        parser.error("prometheus is not installed (apt-get install prometheus; `make install` does it)")
    work = args.work or Path(f"/tmp/dopd-dashboard-{time.strftime('%Y%m%d-%H%M%S')}")
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    commands: list[str] = []
    port = free_port()
    target = f"127.0.0.1:{port}"
    # As benchmarks/bench_planner.py runs the sim engine: GPU-sized batches, KV timeout in wall time.
    env_settings = {"DOPD_MAX_BATCH_SIZE": "256", "DOPD_PREFILL_TOKEN_BUDGET": "8192",
                    "DOPD_KV_TIMEOUT_S": str(30 * args.time_scale)}
    up_argv = [*PY, "services.cli", "up", "--engine", "sim", "--profile", args.profile, "--prefill",
               str(args.prefill), "--decode", str(args.decode), "--time-scale", f"{args.time_scale:g}",
               "--kv-blocks", str(args.kv_blocks), "--mode", "dopd", "--slo-ttft", f"{args.slo_ttft:g}",
               "--slo-tpot", f"{args.slo_tpot:g}", "--port", str(port), "--log-dir", str(work / "logs")]
    commands.append(" ".join(f"{k}={v}" for k, v in env_settings.items()) + " " + shown(up_argv) + " &")
    up = subprocess.Popen(up_argv, stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, **env_settings},
                          start_new_session=True)
    prom = None
    try:
        wait_ready(up, 600)
        status_argv = [*PY, "services.cli", "status", "--target", target, "--json"]
        commands.append(shown(status_argv) + "   # each service's metrics address, for prometheus.yml")
        status = json.loads(subprocess.run(status_argv, capture_output=True, text=True, check=True, cwd=ROOT).stdout)
        jobs: dict[str, list[str]] = {}
        for s in status["services"]:
            jobs.setdefault(s["role"] if s["role"] in ("gateway", "planner") else "workers", []).append(s["metrics"])
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [{"job_name": j, "static_configs": [{"targets": t}]} for j, t in jobs.items()]}
        (work / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        prom_port = free_port()
        prom_url = f"http://127.0.0.1:{prom_port}"
        prom_argv = [prometheus, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
                     f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"]
        commands.append(shown(prom_argv) + " &")
        prom = subprocess.Popen(prom_argv, stdout=open(work / "prometheus.log", "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        time.sleep(5)  # a few scrapes of the idle cluster first
        started = time.time()
        bench_argv = [*PY, "services.cli", "bench", "--target", target, "--workload", args.workload, "--rate",
                      f"{args.rate:g}", "--burstiness", f"{args.burstiness:g}", "--duration", f"{args.duration:g}",
                      "--time-scale", f"{args.time_scale:g}", "--max-context", "8192", "--slo-ttft",
                      f"{args.slo_ttft:g}", "--slo-tpot", f"{args.slo_tpot:g}", "--out", str(work / "bench"),
                      "--no-progress"]
        commands.append(shown(bench_argv))
        subprocess.run(bench_argv, check=True, cwd=ROOT)
        plan_argv = [*PY, "services.cli", "status", "--target", target, "--json"]
        plan = json.loads(subprocess.run(plan_argv, capture_output=True, text=True, check=True, cwd=ROOT).stdout)
        time.sleep(10)  # the scrapes after the last request
        span = time.time() - started + 10
        dash_argv = [*PY, "services.dashboard", "--prometheus", prom_url, "--out", str(args.out), "--range",
                     f"{span:.0f}", "--step", f"{args.step:g}", "--title",
                     f"DOPD serving: sim:{args.profile}, {args.prefill}P:{args.decode}D at the start, "
                     f"{args.workload} at {args.rate:g} req/s (profile time), time scale {args.time_scale:g}"]
        commands.append(shown(dash_argv))
        subprocess.run(dash_argv, check=True, cwd=ROOT)
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(30)
        if up.poll() is None:
            up.send_signal(signal.SIGINT)  # `dopd up` drains and stops the cluster
            up.wait(120)
    results = json.loads((work / "bench" / "results.json").read_text())
    write_readme(args, commands, results, plan, prometheus)
    print(f"wrote {args.out}")
    return 0


def write_readme(args, commands: list[str], results: dict, status: dict, prometheus: str) -> None:
    version = subprocess.run([prometheus, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    panels = json.loads((args.out / "panels.json").read_text())
    plan = status.get("plan") or {}
    switches = [s for s in plan.get("recent_switches", []) if s.get("ok")]
    lines = [
        "# The dashboard, rendered from a run",
        "",
        "Every panel of `deploy/grafana/dashboards/dopd.json` (what Grafana shows under docker-compose.yml),",
        f"rendered by `dopd dashboard` from a real Prometheus ({version}) that scraped every service",
        f"each second while `dopd bench` ran {args.workload} on a simulated cluster (`dopd up --engine sim`:",
        f"the real services, forward passes timed by the {args.profile} profile, {args.time_scale:g}x slower",
        "than the profile). The planner ran in dopd mode (dynamic: it switches roles in place).",
        "",
        "`dashboard.png` is the whole dashboard as Grafana lays it out; `NN-<panel>.png` one panel each;",
        "`panels.json` the queries as run. Times on the x axis are wall seconds; the gateway's latencies and",
        "rates are wall time too (so TTFT and TPOT are the profile's times the time scale, and the SLO lines",
        "with them), the planner's arrival rates are profile time.",
        "",
        "Regenerate everything (about 8 minutes on 2 cores):",
        "",
        "```",
        f"python benchmarks/render_dashboard.py --out {args.out}",
        "```",
        "",
        "which ran, in order:",
        "",
        "```",
        *commands,
        "```",
        "",
        "(`dopd dashboard` is `python -m services.dashboard` where services/cli.py does not have it yet.)",
        "",
        "## The run",
        "",
        f"- `dopd bench` (the client's view): {results['completed']}/{results['requests']} completed, "
        f"SLO attainment {results['slo_attainment']:.3f}, goodput {results['goodput']:.2f} req/s, "
        f"p90 TTFT {results['p90_ttft_ms']:.0f} ms, p90 TPOT {results['p90_tpot_ms']:.1f} ms "
        f"(SLOs {args.slo_ttft:g} / {args.slo_tpot:g} ms, profile time).",
        f"- The planner's role switches ({len(switches)} of the last {len(plan.get('recent_switches', []))} "
        "recorded):",
        "",
        "| worker | from | to | seconds | requests migrated | MB migrated | reason |",
        "| --- | --- | --- | ---: | ---: | ---: | --- |",
        *[f"| {s['worker_id']} | {s['from_role']} | {s['to_role']} | {s['seconds']:.2f} | "
          f"{s.get('migrated_requests', 0)} | {s.get('migrated_bytes', 0) / 1e6:.1f} | {s.get('reason', '')} |"
          for s in switches],
        "",
        "## Panels",
        "",
        "| file | panel | series |",
        "| --- | --- | ---: |",
        *[f"| [{p['file']}]({p['file']}) | {p['title']} | {len(p['series'])} |" for p in panels["panels"]],
        "",
    ]
    (args.out / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
