"""`dopd bench compare`'s report: compare.md's tables and the plots (latency CDFs per mode,
goodput per mode, dopd's P/D split over time), from compare.json's document and the runs chosen."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.comparison.compare_runs import Run

def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{v * 100:+.1f}%"
    if isinstance(v, float):
        return f"{v:.4f}" if 0 < v <= 1.0 else f"{v:.1f}"
    return str(v)


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def slo_words(config: dict) -> str:
    words = f"TTFT {config['slo_ttft_ms']:g} ms, TPOT {config['slo_tpot_ms']:g} ms"
    if config.get("slo_itl_ms") is not None:
        words += f", stall (each request's p99 inter-token gap) {config['slo_itl_ms']:g} ms"
    return words


def markdown(doc: dict) -> str:
    c = doc["config"]
    lines = [f"# dopd bench compare: {c['source']}, {c['workers']} workers, {c['engine_label']}", "",
             f"Command: `{c['command']}`", "",
             f"SLOs: {slo_words(c)}. Goodput: requests a second that "
             "met every SLO. Refused: RESOURCE_EXHAUSTED at once (admission control, or no decode worker with room), "
             "counted as SLO misses. Stalls: each request's p99 inter-token gap, its median and p99 over the "
             "requests, and the longest gap of the run.", "",
             "| mode | split (at the start) | goodput req/s | attainment | p50 / p90 / p99 TTFT ms "
             "| p50 / p90 / p99 TPOT ms | stalls ms: p99 ITL p50 / p99, longest | completed | refused | failed "
             "| switches |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for mode, f in doc["modes"].items():
        ttft = " / ".join(_fmt(f[k]) for k in ("median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms"))
        tpot = " / ".join(_fmt(f[k]) for k in ("median_tpot_ms", "p90_tpot_ms", "p99_tpot_ms"))
        stalls = (" / ".join(_fmt(f.get(k)) for k in ("median_request_p99_itl_ms", "p99_request_p99_itl_ms"))
                  + f", {_fmt(f.get('max_itl_ms'))}")
        split = f["split"] or "none: all do both"
        if f.get("chunk_tokens") is not None:
            split += f", {f['chunk_tokens']} tokens a step"
        lines.append(f"| {mode} | {split} | {f['goodput']:.2f} | {_fmt(f['slo_attainment'])} | {ttft} | {tpot} | "
                     f"{stalls} | {f['completed']} | {f['refused']} | {f['failed']} | {_fmt(f['switches'])} |")
    v = doc.get("dopd_vs_best_baseline")
    if v:
        fig, met, goals = v["figures"], v["met"], v["goals"]
        yes = {k: "yes" if ok else "no" for k, ok in met.items()}
        lines += ["", f"## dopd against the better baseline ({v['baseline']})", "",
                  "| figure | value | goal | met |", "| --- | ---: | ---: | --- |",
                  f"| goodput ratio | {_ratio(fig['goodput_ratio'])} | >= {goals['goodput_ratio']}x | "
                  f"{yes['goodput_ratio']} |",
                  f"| p90 TTFT change | {_fmt(fig['p90_ttft_change'], True)} | "
                  f"<= {goals['p90_ttft_change'] * 100:.0f}% | {yes['p90_ttft_change']} |",
                  f"| p90 TPOT change | {_fmt(fig['p90_tpot_change'], True)} | "
                  f"<= {goals['p90_tpot_change'] * 100:.0f}% | {yes['p90_tpot_change']} |",
                  f"| dopd SLO attainment | {_fmt(fig['attainment'])} | >= {goals['attainment']} | "
                  f"{'yes' if met['attainment'] else 'no'} |"]
    g = doc.get("dopd_vs_best_baseline_goodput_rate")
    if g:
        lines += ["", f"## Goodput as DistServe defines it: the highest rate with >= {g['target_attainment']:.0%} "
                      "of requests meeting every SLO", "", "| mode | goodput (req/s) | per GPU |",
                  "| --- | ---: | ---: |"]
        lines += [f"| {m} | {_fmt(f.get('goodput_rate'))} | {_fmt(f.get('goodput_rate_per_gpu'))} |"
                  for m, f in doc["modes"].items()]
        lines += ["", f"dopd against {g['baseline']}: {_ratio(g['ratio'])} (goal >= {g['goal']}x: "
                      f"{'met' if g['met'] else 'not met'})"]
    lines += _peers_and_choices(doc)
    if doc.get("reach"):
        lines += ["", reach_markdown(doc["reach"]["run"], doc["reach"]["sweeps"]).rstrip("\n")]
    static = doc["modes"].get("static")
    if static and static.get("splits_tried"):
        lines += ["", "## static: every split tried", "", "| split | engine | goodput req/s | attainment |",
                  "| --- | --- | ---: | ---: |"]
        lines += [f"| {s['split']} | {s['engine']} | {s['goodput']:.2f} | {_fmt(s['slo_attainment'])} |"
                  for s in static["splits_tried"]]
    return "\n".join(lines) + "\n"


def _peers_and_choices(doc: dict) -> list[str]:
    """dopd against each peer as its users run it, and what the variants chose."""
    lines = []
    peers = doc.get("dopd_vs_peers")
    if peers:
        lines += ["", "## dopd against the peers as their users run them", "",
                  "| peer | goodput ratio | p90 TTFT change | p90 TPOT change |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {peer} | {_ratio(v['figures']['goodput_ratio'])} | {_fmt(v['figures']['p90_ttft_change'], True)} "
                  f"| {_fmt(v['figures']['p90_tpot_change'], True)} |" for peer, v in peers.items()]
    apriori = doc["modes"].get("static-apriori", {}).get("chosen_on")
    if apriori:
        fit = ", ".join(f"{f['split']} {f['goodput']:.2f}" for f in apriori["fit"])
        lines += ["", f"static-apriori: split {apriori['split']}, the simulator's best on the first "
                      f"{apriori['until_s']:g} s (goodput req/s by split there: {fit}), kept for the whole run."]
    budgets = doc["modes"].get("aggregated-best", {}).get("budgets_tried")
    if budgets:
        tried = ", ".join(f"{b['chunk_tokens']}: {b['goodput']:.2f} req/s ({_fmt(b['slo_attainment'])})"
                          for b in budgets)
        lines += ["", f"aggregated-best: every chunk budget tried (tokens a step: goodput, attainment): {tried}."]
    return lines


def _verdict(reachable: bool | None) -> str:
    return "not judged" if reachable is None else "not ruled out" if reachable else "**no: no scheduler can**"


def _asks_and_bound(figure: dict) -> str:
    mark = " (out of reach)" if figure["reachable"] is False else ""
    return f"{_fmt(figure['asks'])} / {_fmt(figure['bound'])}{mark}"


def reach_markdown(run: dict, sweeps: list[dict] = (), title: str = "## What any scheduler could reach") -> str:
    """reach()'s bounds for the run (and each swept rate) as tables (services/bench/reach.py)."""
    f = run["figures"]
    share = run["keep"] / run["requests"]
    lines = [title, "",
             f"Bounds from the latency profile on every request of the schedule ({run['requests']}), for a run "
             f"that completes at least {run['keep']} of them ({share:.1%}: what the attainment goal needs; a run "
             f"that refuses more could have a lower p90). The goals are against {run['baseline']}; goodput is the "
             "run's (requests a second meeting both SLOs), not DistServe's rate goodput, which is not bounded "
             "here. services/bench/reach.py says why each bound holds.", "",
             "| figure | the goal asks | bound | reachable by any scheduler |", "| --- | ---: | ---: | --- |",
             f"| goodput req/s | >= {_fmt(f['goodput']['asks'])} | <= {_fmt(f['goodput']['bound'])}: every request "
             f"met, by the last send at {run['last_send_s']:.1f} s | {_verdict(f['goodput']['reachable'])} |",
             f"| p90 TTFT ms | <= {_fmt(f['p90_ttft_ms']['asks'])} | >= {_fmt(f['p90_ttft_ms']['bound'])}: each prompt "
             f"prefilled the cheapest way, alone, at once | {_verdict(f['p90_ttft_ms']['reachable'])} |",
             f"| p90 TPOT ms | <= {_fmt(f['p90_tpot_ms']['asks'])} | " + (
                 "none: on the real services TPOT is timed at the client, where tokens can arrive together"
                 if f["p90_tpot_ms"]["bound"] is None else
                 f">= {_fmt(f['p90_tpot_ms']['bound'])}: the profile's cheapest forward (a weak bound)")
             + f" | {_verdict(f['p90_tpot_ms']['reachable'])} |"]
    if sweeps:
        lines += ["", "At each rate of the goodput sweeps, against the better baseline there (by goodput):", "",
                  "| rate req/s | baseline | its attainment | dopd's attainment | goodput asks / ceiling "
                  "| p90 TTFT asks / floor ms | p90 TPOT asks / floor ms |",
                  "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        for row in sweeps:
            pairs = " | ".join(_asks_and_bound(row["figures"][k]) for k in ("goodput", "p90_ttft_ms", "p90_tpot_ms"))
            lines.append(f"| {row['rate']:g} | {row['baseline']} | {_fmt(row['baseline_attainment'])} | "
                         f"{_fmt(row['dopd_attainment'])} | {pairs} |")
    return "\n".join(lines) + "\n"


def plot(chosen: dict[str, Run], out: Path, slo_ttft_ms: float, slo_tpot_ms: float) -> list[Path]:
    """Latency CDFs per mode, goodput per mode, and dopd's P/D split over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, what, slo in ((axes[0], "TTFT", slo_ttft_ms), (axes[1], "TPOT", slo_tpot_ms)):
        for mode, run in chosen.items():
            ms = sorted((r.ttft if what == "TTFT" else r.tpot) * 1e3 for r in run.requests
                        if r.ok and (r.ttft if what == "TTFT" else r.tpot) is not None)
            if ms:
                ax.plot(ms, [(i + 1) / len(run.requests) for i in range(len(ms))], label=mode)
        ax.axvline(slo, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel(f"{what} (ms, log)")
        ax.set_ylabel("fraction of all requests")
        ax.set_title(f"{what} CDF (failed and refused requests never reach 1)")
        ax.legend()
    fig.tight_layout()
    paths.append(out / "latency_cdfs.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(chosen)
    ax.bar(names, [chosen[m].results["goodput"] for m in names], color="tab:blue")
    for i, m in enumerate(names):
        ax.annotate(f"{(chosen[m].results['slo_attainment'] or 0) * 100:.1f}%", (i, chosen[m].results["goodput"]),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("goodput (req/s meeting both SLOs)")
    ax.set_title("goodput per mode (label: SLO attainment)")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    paths.append(out / "goodput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    dopd = chosen.get("dopd")
    if dopd is not None and dopd.samples:
        fig, ax = plt.subplots(figsize=(9, 3.5))
        t = [s.t for s in dopd.samples]
        ax.step(t, [s.prefill_workers for s in dopd.samples], where="post", label="prefill workers")
        ax.step(t, [s.decode_workers for s in dopd.samples], where="post", label="decode workers (mixed ones too)")
        if any(s.mixed_workers for s in dopd.samples):
            ax.step(t, [s.mixed_workers for s in dopd.samples], where="post", label="of them mixed", linestyle=":")
        ax.set_xlabel("time (s)")
        ax.set_ylabel("workers")
        ax2 = ax.twinx()
        arrivals = dopd.results["timeline"]["arrivals_per_s"]
        ax2.plot([i + 0.5 for i in range(len(arrivals))], arrivals, color="grey", alpha=0.5, label="arrivals/s")
        ax2.set_ylabel("arrivals per second")
        ax.legend(loc="upper left")
        ax.set_title("dopd: the P/D split over time")
        fig.tight_layout()
        paths.append(out / "dopd_split.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
