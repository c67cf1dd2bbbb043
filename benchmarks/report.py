"""Figures of a benchmark run: each with its unit, target and verdict; printed as they come, then as
one rich table, and dumped as JSON."""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

# Piped output (logs, CI) gets a wide fixed width instead of rich's 80 columns.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)


@dataclass
class Figure:
    section: str
    name: str
    value: float | int | str | None
    unit: str = ""
    target: str = ""  # e.g. ">= 0.8x"; empty for figures that only inform
    passed: bool | None = None
    note: str = ""

    def verdict(self) -> str:
        if self.passed is None:
            return ""
        return "PASS" if self.passed else "FAIL"

    def value_text(self) -> str:
        if self.value is None:
            return "n/a"
        if isinstance(self.value, float):
            v = self.value
            text = f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 10_000 else f"{v:,.0f}"
        elif isinstance(self.value, int):
            text = f"{self.value:,}"
        else:
            text = str(self.value)
        return f"{text} {self.unit}".strip()


def at_least(value: float | None, target: float) -> bool | None:
    return None if value is None else value >= target


def at_most(value: float | None, target: float) -> bool | None:
    return None if value is None else value <= target


@dataclass
class Report:
    started: float = field(default_factory=time.time)
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, dict] = field(default_factory=dict)
    meta: dict[str, object] = field(default_factory=dict)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        verdict = figure.verdict()
        style = {"PASS": "green", "FAIL": "red"}.get(verdict, "")
        target = f"  (target {figure.target}: [{style}]{verdict}[/{style}])" if figure.target else ""
        note = f"  [dim]{figure.note}[/dim]" if figure.note else ""
        console.print(f"  [bold]{figure.section}[/bold] {figure.name}: {figure.value_text()}{target}{note}")
        return figure

    def table(self) -> Table:
        table = Table(title="DOPD core benchmark", show_lines=False)
        for name, kw in (("section", {}), ("figure", {}), ("value", {"justify": "right"}), ("target", {}),
                         ("verdict", {}), ("note", {"overflow": "fold"})):
            table.add_column(name, **kw)
        for f in self.figures:
            verdict = f.verdict()
            style = {"PASS": "green", "FAIL": "red"}.get(verdict)
            table.add_row(f.section, f.name, f.value_text(), f.target,
                          f"[{style}]{verdict}[/{style}]" if style else verdict, f.note)
        return table

    def to_json(self) -> dict:
        return {
            "started_unix": self.started,
            "elapsed_s": time.time() - self.started,
            "host": {"python": platform.python_version(), "machine": platform.machine()},
            "meta": self.meta,
            "figures": [asdict(f) | {"verdict": f.verdict() or None} for f in self.figures],
            "details": self.details,
        }

    def dump(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2, default=str) + "\n")
