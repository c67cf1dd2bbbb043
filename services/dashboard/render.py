"""Draw the dashboard's panels with matplotlib: one PNG a panel, and the whole dashboard laid out
as Grafana lays it out (its gridPos) in one more."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.gridspec import GridSpec  # noqa: E402

from services.dashboard.panels import Panel, legend  # noqa: E402
from services.dashboard.prometheus import Series  # noqa: E402


@dataclass
class PanelData:
    panel: Panel
    series: list[tuple[str, Series]] = field(default_factory=list)  # (legend, series)
    queries: dict[str, str] = field(default_factory=dict)  # refId -> the query as run
    errors: dict[str, str] = field(default_factory=dict)  # refId -> Prometheus' error
    empty: list[str] = field(default_factory=list)  # refIds that returned no finite point

    def add(self, ref: str, fmt: str, result: list[Series]) -> None:
        self.series.extend((legend(fmt, s.labels), s) for s in result)
        if not any(s.finite for s in result):
            self.empty.append(ref)


def _scale(unit: str, values: list[float]) -> tuple[float, str]:
    """(factor, axis label) for a Grafana unit, picked from the values' magnitude."""
    peak = max((abs(v) for v in values if math.isfinite(v)), default=0.0)
    if unit == "s":
        return (1e3, "ms") if peak < 1 else (1.0, "s")
    if unit == "percentunit":
        return 100.0, "%"
    if unit == "reqps":
        return 1.0, "requests/s"
    if unit == "Bps":
        for factor, name in ((1e9, "GB/s"), (1e6, "MB/s"), (1e3, "kB/s")):
            if peak >= factor:
                return 1 / factor, name
        return 1.0, "B/s"
    return 1.0, ""


def draw(ax, data: PanelData, start: float, step: float, compact: bool = False) -> None:
    panel = data.panel
    values = [v for _, s in data.series for _, v in s.points]
    factor, label = _scale(panel.unit, values)
    drawn = [(name, s) for name, s in data.series if s.finite]
    width = step / max(1, len(drawn))
    for i, (name, s) in enumerate(drawn):
        xs = [t - start for t, _ in s.points]
        ys = [v * factor if math.isfinite(v) else math.nan for _, v in s.points]
        if panel.style == "bars":
            ax.bar([x + (i - (len(drawn) - 1) / 2) * width for x in xs], ys, width=width, label=name, alpha=0.8)
        else:
            [line] = ax.plot(xs, ys, label=name, linewidth=1.4, linestyle="--" if panel.is_dashed(name) else "-",
                             drawstyle="steps-post" if panel.style == "steps" else "default")
            # a point with no finite neighbour draws no line: mark it
            finite = [math.isfinite(y) for y in ys]
            alone = [(x, y) for i, (x, y) in enumerate(zip(xs, ys, strict=True))
                     if finite[i] and not (i > 0 and finite[i - 1]) and not (i + 1 < len(ys) and finite[i + 1])]
            if alone:
                ax.plot(*zip(*alone, strict=True), "o", color=line.get_color(), markersize=3)
    ax.set_title(panel.title, fontsize=10 if compact else 12, loc="left")
    ax.set_ylabel(label, fontsize=8 if compact else 10)
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=7 if compact else 9)
    if panel.unit == "percentunit":
        ax.set_ylim(0, 105)
    else:
        top = max((v * factor for _, s in drawn for _, v in s.finite), default=0.0)
        ax.set_ylim(0, top * 1.12 if top > 0 else 1)
    if drawn and compact:
        ax.legend(fontsize=6, loc="best", framealpha=0.6)
    elif drawn:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    else:
        reason = "query failed" if data.errors else "no data"
        ax.text(0.5, 0.5, reason, transform=ax.transAxes, ha="center", va="center", color="grey")


def _xlabel(start: float) -> str:
    return f"seconds from {datetime.fromtimestamp(start, UTC):%Y-%m-%d %H:%M:%S} UTC"


def write_panel(data: PanelData, path: Path, start: float, end: float, step: float) -> None:
    fig, ax = plt.subplots(figsize=(10, 3.6), dpi=110)
    draw(ax, data, start, step)
    ax.set_xlim(0, end - start)
    ax.set_xlabel(_xlabel(start), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_overview(panels: list[PanelData], path: Path, start: float, end: float, step: float,
                   title: str = "") -> None:
    """Every panel where Grafana puts it: gridPos on a 24-column grid."""
    rows = max(d.panel.grid[1] + d.panel.grid[3] for d in panels)
    fig = plt.figure(figsize=(16, rows * 0.45 + 0.8), dpi=100)
    grid = GridSpec(rows, 24, figure=fig, hspace=0, wspace=0, left=0.04, right=0.99, top=0.97, bottom=0.03)
    for d in panels:
        x, y, w, h = d.panel.grid
        # a grid unit around each panel for its title and tick labels
        ax = fig.add_subplot(grid[y + 1:y + h - 1, x + (1 if x else 0):x + w - 1])
        draw(ax, d, start, step, compact=True)
        ax.set_xlim(0, end - start)
    if title:
        fig.suptitle(title, fontsize=13)
    fig.supxlabel(_xlabel(start), fontsize=9)
    fig.savefig(path)
    plt.close(fig)
