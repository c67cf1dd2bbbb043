"""`dopd dashboard`: render every panel of the Grafana dashboard (deploy/grafana/dashboards/dopd.json,
the same queries Grafana runs) to PNG from a Prometheus server, through /api/v1/query_range.

    dopd dashboard --prometheus http://127.0.0.1:9090 --out DIR [--range S] [--step S] [--end UNIX]
                   [--scrape-interval S] [--dashboard FILE] [--require-data]

Writes DIR/NN-<panel>.png for each panel, DIR/dashboard.png (every panel where Grafana places it)
and DIR/panels.json (each panel's queries as run, with their series and point counts).
Exit status: 0; 1 when a query failed or, with --require-data, when a query returned no data;
2 when Prometheus cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `dashboard` to a `dopd` subparsers object; it runs `run`."""
    from services.dashboard.panels import DASHBOARD

    p = subparsers.add_parser("dashboard", help="render the Grafana dashboard's panels to PNG from Prometheus",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prometheus", required=True, metavar="URL", help="Prometheus' base URL, e.g. http://127.0.0.1:9090")
    p.add_argument("--out", required=True, type=Path, help="directory for the PNGs and panels.json")
    p.add_argument("--range", type=float, default=900.0, metavar="S", help="seconds of history up to --end (900)")
    p.add_argument("--step", type=float, metavar="S", help="seconds between points (default: range / 240, >= 1)")
    p.add_argument("--end", type=float, metavar="UNIX", help="the range's end, unix seconds (default: now)")
    p.add_argument("--scrape-interval", type=float, metavar="S",
                   help="for $__rate_interval (default: the server's global scrape_interval)")
    p.add_argument("--dashboard", type=Path, default=DASHBOARD, help=f"the dashboard JSON (default {DASHBOARD})")
    p.add_argument("--title", default="", help="a title over dashboard.png")
    p.add_argument("--require-data", action="store_true", help="exit 1 when any panel query returns no data")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from services.dashboard.panels import expand, load_panels
    from services.dashboard.prometheus import Prometheus, PrometheusError
    from services.dashboard.render import PanelData, write_overview, write_panel

    if not args.range > 0:
        print("--range must be > 0", file=sys.stderr)
        return 2
    prom = Prometheus(args.prometheus)
    end = args.end if args.end is not None else time.time()
    start = end - args.range
    step = args.step or max(1.0, round(args.range / 240))
    try:
        scrape = args.scrape_interval or prom.scrape_interval()
        prom.query("vector(1)")  # reachable at all?
    except PrometheusError as exc:
        print(exc, file=sys.stderr)
        return 2
    panels = load_panels(args.dashboard)
    args.out.mkdir(parents=True, exist_ok=True)
    rendered, summary = [], []
    for panel in panels:
        data = PanelData(panel)
        for target in panel.targets:
            expr = expand(target.expr, step, scrape, args.range)
            data.queries[target.ref] = expr
            try:
                data.add(target.ref, target.legend, prom.query_range(expr, start, end, step))
            except PrometheusError as exc:
                data.errors[target.ref] = str(exc)
        path = args.out / f"{panel.slug}.png"
        write_panel(data, path, start, end, step)
        rendered.append(data)
        summary.append({"id": panel.id, "title": panel.title, "file": path.name, "queries": data.queries,
                        "series": {name: len(s.finite) for name, s in data.series},
                        "empty": data.empty, "errors": data.errors})
        state = ("FAILED " + "; ".join(data.errors.values()) if data.errors else
                 f"no data from {','.join(data.empty)}" if data.empty else f"{len(data.series)} series")
        print(f"{path}: {state}")
    overview = args.out / "dashboard.png"
    write_overview(rendered, overview, start, end, step, args.title)
    (args.out / "panels.json").write_text(json.dumps(
        {"prometheus": args.prometheus, "start": start, "end": end, "step": step, "scrape_interval": scrape,
         "dashboard": _shown(args.dashboard), "panels": summary}, indent=2) + "\n")
    print(f"{overview}: {len(rendered)} panels")
    failed = any(d.errors for d in rendered) or (args.require_data and any(d.empty for d in rendered))
    return 1 if failed else 0


def _shown(path: Path) -> str:
    """The dashboard file as the repository names it, where it is the repository's."""
    from services.dashboard.panels import DASHBOARD

    root = DASHBOARD.parents[3]
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    """`python -m services.dashboard ...`, until `dopd dashboard` is wired into services/cli.py."""
    parser = argparse.ArgumentParser(prog="dopd")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["dashboard", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
