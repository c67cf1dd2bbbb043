"""PNG plots of a run (matplotlib, Agg backend): latency CDFs, the timeline of arrivals, queues and
workers, and, for sweeps, SLO attainment against the request rate."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
from matplotlib.ticker import MaxNLocator  # noqa: E402

from services.bench.metrics import RequestResult  # noqa: E402
from services.bench.outcome import StatusSample  # noqa: E402


def _cdf(ax, values_ms: Sequence[float], title: str, slo_ms: float | None) -> None:
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of requests")
    ax.grid(alpha=0.3)
    if values_ms:
        xs = sorted(values_ms)
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    if slo_ms is not None:
        ax.axvline(slo_ms, color="red", linestyle="--", label=f"SLO {slo_ms:g} ms")
        ax.legend(loc="lower right")
    ax.set_ylim(0, 1.02)


def plot_latency_cdfs(results: Sequence[RequestResult], out_dir: Path, slo_ttft_ms: float | None = None,
                      slo_tpot_ms: float | None = None, name: str = "latency_cdf.png") -> Path:
    """CDFs of TTFT, TPOT and E2EL over the completed requests."""
    done = [r for r in results if r.ok]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    _cdf(axes[0], [r.ttft * 1000 for r in done if r.ttft is not None], "TTFT", slo_ttft_ms)
    _cdf(axes[1], [t * 1000 for r in done if (t := r.tpot) is not None], "TPOT", slo_tpot_ms)
    _cdf(axes[2], [r.e2e * 1000 for r in done if r.e2e is not None], "E2EL", None)
    fig.suptitle(f"{len(done)} completed, {len(results) - len(done)} failed")
    return _save(fig, out_dir / name)


def plot_timeline(samples: Sequence[StatusSample], arrivals_per_s: Sequence[int], out_dir: Path,
                  name: str = "timeline.png") -> Path:
    """Arrival rate (per second, from the schedule), queue depths (waiting + running per role, and
    the gateway's in-flight requests) and the number of serving prefill/decode workers."""
    ok = [s for s in samples if s.error is None]
    ts = [s.t for s in ok]
    fig, axes = plt.subplots(3, 1, figsize=(12, 9), sharex=True)
    axes[0].bar([i + 0.5 for i in range(len(arrivals_per_s))], arrivals_per_s, width=1.0, alpha=0.6)
    axes[0].set_ylabel("arrivals / s")
    axes[1].step(ts, [s.prefill_waiting + s.prefill_running for s in ok], where="post",
                 label="prefill waiting + running")
    axes[1].step(ts, [s.decode_waiting + s.decode_running for s in ok], where="post", label="decode waiting + running")
    axes[1].step(ts, [s.gateway_running for s in ok], where="post", label="gateway in flight", linestyle=":")
    axes[1].set_ylabel("requests")
    axes[1].legend(loc="upper left")
    axes[2].step(ts, [s.prefill_workers for s in ok], where="post", label="prefill workers", linewidth=3, alpha=0.6)
    axes[2].step(ts, [s.decode_workers for s in ok], where="post", label="decode workers (mixed ones too)",
                 linestyle="--")
    if any(s.mixed_workers for s in ok):
        axes[2].step(ts, [s.mixed_workers for s in ok], where="post", label="of them mixed", linestyle=":")
    axes[2].set_ylabel("workers")
    axes[2].set_ylim(bottom=0, top=max([s.prefill_workers for s in ok] + [s.decode_workers for s in ok] + [1]) + 1)
    axes[2].set_xlabel("time (s)")
    axes[2].legend(loc="upper left")
    for t in (s.t for s in samples if s.error is not None):
        axes[1].axvline(t, color="red", alpha=0.2)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, out_dir / name)


def plot_attainment_vs_rate(points: Sequence[tuple[float, float]], out_dir: Path, target: float = 0.9,
                            best_rate: float | None = None, name: str = "attainment_vs_rate.png") -> Path:
    """SLO attainment (fraction of all requests meeting both SLOs) at each swept rate."""
    pts = sorted(points)
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot([r for r, _ in pts], [a for _, a in pts], marker="o")
    ax.axhline(target, color="red", linestyle="--", label=f"target {target:.0%}")
    if best_rate is not None:
        ax.axvline(best_rate, color="green", linestyle=":", label=f"goodput {best_rate:g} req/s")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    return _save(fig, out_dir / name)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
