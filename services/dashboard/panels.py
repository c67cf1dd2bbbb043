"""The Grafana dashboard's panels as plain data, and the PromQL they run. Pure: no I/O but
reading the dashboard file.

deploy/grafana/dashboards/dopd.json is the one source of the queries: Grafana shows it
(docker-compose.yml provisions it), `dopd dashboard` renders the same panels to PNG, and the tests
evaluate every query against a live cluster. Grafana's variables in a query are expanded here as
Grafana does for a time series query:

    $__interval       the step between points
    $__rate_interval  max($__interval + scrape interval, 4 x scrape interval)
    $__range          the whole time range
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

# The repository's copy (an editable install, or /app in the image).
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "dopd.json"


@dataclass(frozen=True)
class Target:
    ref: str
    expr: str
    legend: str  # Grafana's legendFormat: "{{label}}" is the series' label value


@dataclass(frozen=True)
class Panel:
    id: int
    title: str
    unit: str  # Grafana's unit id: s, percentunit, reqps, Bps, short
    style: str  # line | steps (Grafana: lineInterpolation stepAfter) | bars
    description: str
    grid: tuple[int, int, int, int]  # Grafana's gridPos: x, y, w, h (24 columns)
    targets: tuple[Target, ...]
    # Series drawn dashed: regular expressions (or names) of the panel's lineStyle overrides
    dashed: tuple[str, ...] = ()

    def is_dashed(self, name: str) -> bool:
        return any(re.fullmatch(pattern, name) for pattern in self.dashed)

    @property
    def slug(self) -> str:
        return f"{self.id:02d}-" + re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")


def load_panels(path: Path = DASHBOARD) -> list[Panel]:
    """Every panel with queries, in the dashboard's order (rows flattened)."""
    doc = json.loads(Path(path).read_text())
    raw = []
    for p in doc.get("panels", []):
        raw.extend(p.get("panels", []) if p.get("type") == "row" else [p])
    panels = []
    for p in raw:
        targets = tuple(Target(t.get("refId", chr(ord("A") + i)), t["expr"], t.get("legendFormat", ""))
                        for i, t in enumerate(p.get("targets", [])) if t.get("expr") and not t.get("hide"))
        if not targets:
            continue
        defaults = p.get("fieldConfig", {}).get("defaults", {})
        custom = defaults.get("custom", {})
        style = custom.get("drawStyle", "line")
        if style == "line" and custom.get("lineInterpolation") in ("stepAfter", "stepBefore"):
            style = "steps"
        dashed = []
        for override in p.get("fieldConfig", {}).get("overrides", []):
            matcher = override.get("matcher", {})
            if matcher.get("id") not in ("byName", "byRegexp"):
                continue
            pattern = matcher.get("options", "")
            if matcher["id"] == "byName":
                pattern = re.escape(pattern)
            if any(prop.get("id") == "custom.lineStyle" and prop.get("value", {}).get("fill") in ("dash", "dot")
                   for prop in override.get("properties", [])):
                dashed.append(pattern)
        g = p.get("gridPos", {})
        panels.append(Panel(id=int(p["id"]), title=p.get("title", f"panel {p['id']}"),
                            unit=defaults.get("unit", "short"), style=style,
                            description=p.get("description", ""),
                            grid=(g.get("x", 0), g.get("y", 0), g.get("w", 12), g.get("h", 8)), targets=targets,
                            dashed=tuple(dashed)))
    return panels


def duration(seconds: float) -> str:
    """A PromQL duration: whole seconds, or milliseconds below a second."""
    if seconds <= 0:
        raise ValueError(f"a duration must be > 0, got {seconds}")
    if seconds < 1 or seconds != int(seconds):
        return f"{max(1, round(seconds * 1000))}ms"
    return f"{int(seconds)}s"


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)")
_UNIT_S = {"ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def parse_duration(text: str) -> float:
    """Seconds in a Prometheus duration ("15s", "1m30s", "500ms")."""
    parts = _DURATION_PART.findall(text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def rate_interval(step_s: float, scrape_s: float) -> float:
    """Grafana's $__rate_interval for a step and a scrape interval."""
    return max(step_s + scrape_s, 4 * scrape_s)


def expand(expr: str, step_s: float, scrape_s: float, range_s: float) -> str:
    """The query with Grafana's interval variables replaced ($__rate_interval before
    $__interval: one is a prefix of the other's name)."""
    return (expr.replace("$__rate_interval", duration(rate_interval(step_s, scrape_s)))
            .replace("${__rate_interval}", duration(rate_interval(step_s, scrape_s)))
            .replace("$__interval", duration(step_s)).replace("${__interval}", duration(step_s))
            .replace("$__range", duration(range_s)).replace("${__range}", duration(range_s)))


_LEGEND_VAR = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def legend(fmt: str, labels: dict[str, str]) -> str:
    """A series' name as Grafana writes it: the legend format with {{label}} replaced, or the
    series' labels when there is no format."""
    if fmt:
        return _LEGEND_VAR.sub(lambda m: labels.get(m.group(1), ""), fmt)
    shown = {k: v for k, v in labels.items() if k != "__name__"}
    inner = ", ".join(f'{k}="{v}"' for k, v in sorted(shown.items()))
    return labels.get("__name__", "") + (f"{{{inner}}}" if inner else "") or "value"


def metric_names(expr: str) -> set[str]:
    """The dopd_* metric names a query reads (a metric's _bucket/_sum/_count series named as is)."""
    return set(re.findall(r"\bdopd_[a-z0-9_]+", expr))
