"""DistServe's goodput: the highest request rate at which at least 90% of requests meet both the
TTFT and the TPOT SLO (Zhong et al., OSDI'24), found by running the workload at several rates.

`RateSearch` (pure) proposes the rates: either a given list, in increasing order, or a doubling
search from `min_rate` (up to `max_rate`) until a rate misses the target, then bisection between
the highest rate that met it and the lowest that did not, until they are within `rel_tol` of
each other. Either way at most `max_runs` runs. `run_sweep` drives it with a function that runs
the workload at one rate and returns its summary, and writes sweep.json and the plot.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

DEFAULT_TARGET = 0.9


class RateSearch:
    def __init__(self, *, rates: Sequence[float] | None = None, min_rate: float | None = None,
                 max_rate: float | None = None, target: float = DEFAULT_TARGET, max_runs: int = 8,
                 rel_tol: float = 0.1) -> None:
        if (rates is None) == (min_rate is None):
            raise ValueError("give either a list of rates or a min_rate to search from")
        if rates is not None and (not rates or any(not r > 0 for r in rates)):
            raise ValueError(f"rates must be a non-empty list of numbers > 0, got {rates}")
        if min_rate is not None and not min_rate > 0:
            raise ValueError(f"min_rate must be > 0, got {min_rate}")
        if max_rate is not None and min_rate is not None and max_rate < min_rate:
            raise ValueError(f"max_rate ({max_rate}) is below min_rate ({min_rate})")
        if max_runs < 1:
            raise ValueError(f"max_runs must be >= 1, got {max_runs}")
        self.rates = sorted(set(rates)) if rates is not None else None
        self.min_rate, self.max_rate = min_rate, max_rate
        self.target, self.max_runs, self.rel_tol = target, max_runs, rel_tol
        self.points: list[tuple[float, float]] = []  # (rate, attainment) in the order run

    def passes(self, attainment: float | None) -> bool:
        return attainment is not None and attainment >= self.target

    def record(self, rate: float, attainment: float | None) -> None:
        self.points.append((rate, attainment if attainment is not None else 0.0))

    def _bounds(self) -> tuple[float | None, float | None]:
        """(highest rate that met the target, lowest rate above it that did not)."""
        good = [r for r, a in self.points if self.passes(a)]
        lo = max(good) if good else None
        bad = [r for r, a in self.points if not self.passes(a) and (lo is None or r > lo)]
        return lo, (min(bad) if bad else None)

    def next_rate(self) -> float | None:
        """The next rate to run, or None when the search is over."""
        if len(self.points) >= self.max_runs:
            return None
        if self.rates is not None:
            return self.rates[len(self.points)] if len(self.points) < len(self.rates) else None
        if not self.points:
            return self.min_rate
        lo, hi = self._bounds()
        if lo is None:
            return None  # even min_rate misses the target
        if hi is None:  # still doubling
            if self.max_rate is not None and lo >= self.max_rate:
                return None
            return lo * 2 if self.max_rate is None else min(lo * 2, self.max_rate)
        if (hi - lo) / lo <= self.rel_tol:
            return None
        return (lo + hi) / 2

    def best(self) -> float | None:
        """The highest rate run whose attainment met the target (None when none did)."""
        good = [r for r, a in self.points if self.passes(a)]
        return max(good) if good else None


def run_sweep(search: RateSearch, run_at: Callable[[float], dict], out_dir: Path) -> dict:
    """Run `run_at(rate) -> summary` (a dict with slo_attainment) at each rate the search proposes;
    write out_dir/sweep.json and out_dir/attainment_vs_rate.png; return what sweep.json holds."""
    runs = []
    while (rate := search.next_rate()) is not None:
        summary = run_at(rate)
        search.record(rate, summary.get("slo_attainment"))
        runs.append({"rate": rate, "slo_attainment": summary.get("slo_attainment"),
                     "goodput": summary.get("goodput"), "completed": summary.get("completed"),
                     "failed": summary.get("failed"), "p90_ttft_ms": summary.get("p90_ttft_ms"),
                     "p90_tpot_ms": summary.get("p90_tpot_ms")})
    best = search.best()
    result = {"target_attainment": search.target, "goodput_rate": best, "runs": runs}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sweep.json").write_text(json.dumps(result, indent=2))
    from services.bench.plots import plot_attainment_vs_rate

    plot_attainment_vs_rate(search.points, out_dir, target=search.target, best_rate=best)
    return result
