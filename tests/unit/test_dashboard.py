"""The dashboard's panels (deploy/grafana/dashboards/dopd.json) and `dopd dashboard`'s pure parts:
Grafana's variables, legends, durations; every query parses and reads only metrics the services
define; a panel renders to PNG from given series."""

from __future__ import annotations

import json
import re

import prometheus_client
import pytest

from services.dashboard import panels as dash
from services.dashboard.prometheus import Series
from services.dashboard.render import PanelData, write_overview, write_panel


def defined_metrics() -> set[str]:
    """Every metric family the gateway, planner and worker define (their modules register them)."""
    import services.engine.metrics  # noqa: F401
    import services.gateway.metrics  # noqa: F401
    import services.planner.metrics  # noqa: F401

    names = set()
    for family in prometheus_client.REGISTRY.collect():
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
    return names


def test_every_panel_has_queries_and_a_place():
    panels = dash.load_panels()
    titles = [p.title for p in panels]
    for wanted in ("Time to first token (TTFT)", "Time per output token (TPOT)", "Goodput and throughput",
                   "SLO attainment", "P/D split", "Role switches", "KV cache usage per worker", "Queue depths",
                   "Live migrations"):
        assert wanted in titles
    assert len({p.id for p in panels}) == len(panels)
    cells = set()
    for p in panels:
        x, y, w, h = p.grid
        assert 0 <= x and x + w <= 24
        area = {(i, j) for i in range(x, x + w) for j in range(y, y + h)}
        assert not area & cells, f"{p.title} overlaps another panel"
        cells |= area
    ttft = next(p for p in panels if p.title.startswith("Time to first token"))
    assert [t.legend for t in ttft.targets] == ["p50", "p90", "p99", "SLO"]


def test_panels_read_only_metrics_the_services_define():
    defined = defined_metrics()
    missing = {f"{p.title}: {name}" for p in dash.load_panels() for t in p.targets
               for name in dash.metric_names(t.expr)
               if name not in defined and re.sub(r"_(bucket|sum|count)$", "", name) not in defined}
    assert not missing, f"panels read metrics no service defines: {sorted(missing)}"


def test_kv_capacity_gauge_is_not_a_total():
    defined = defined_metrics()
    assert "dopd_kv_blocks_capacity" in defined and "dopd_kv_blocks_total" not in defined


def test_grafana_variables_expand_as_grafana_does():
    expr = "rate(x[$__rate_interval]) + rate(y[$__interval]) + increase(z[${__range}])"
    # $__rate_interval = max(step + scrape, 4 x scrape)
    assert dash.expand(expr, 5, 1, 600) == "rate(x[6s]) + rate(y[5s]) + increase(z[600s])"
    assert dash.expand(expr, 15, 15, 3600) == "rate(x[60s]) + rate(y[15s]) + increase(z[3600s])"
    assert dash.expand("rate(x[$__interval])", 0.5, 1, 60) == "rate(x[500ms])"
    assert dash.parse_duration("1m30s") == 90 and dash.parse_duration("500ms") == 0.5
    with pytest.raises(ValueError):
        dash.parse_duration("5 s")
    with pytest.raises(ValueError):
        dash.duration(0)


def test_legends():
    assert dash.legend("{{worker_id}} waiting", {"worker_id": "decode-0", "instance": "a:1"}) == "decode-0 waiting"
    assert dash.legend("{{ from_role }} -> {{to_role}}", {"from_role": "decode", "to_role": "prefill"}) == \
        "decode -> prefill"
    assert dash.legend("", {"__name__": "up", "job": "gateway"}) == 'up{job="gateway"}'
    assert dash.legend("", {}) == "value"


def test_dashboard_reads_rows_and_skips_hidden_targets(tmp_path):
    doc = {"panels": [{"type": "row", "panels": [
        {"id": 7, "type": "timeseries", "title": "In a row", "gridPos": {"x": 0, "y": 0, "w": 24, "h": 6},
         "fieldConfig": {"defaults": {"unit": "s", "custom": {"lineInterpolation": "stepAfter"}}},
         "targets": [{"refId": "A", "expr": "up"}, {"refId": "B", "expr": "down", "hide": True}]}]},
        {"id": 8, "type": "text", "title": "no queries"}]}
    path = tmp_path / "d.json"
    path.write_text(json.dumps(doc))
    [panel] = dash.load_panels(path)
    assert (panel.id, panel.unit, panel.style, panel.grid) == (7, "s", "steps", (0, 0, 24, 6))
    assert [t.expr for t in panel.targets] == ["up"]
    assert panel.slug == "07-in-a-row"


def test_render_writes_pngs(tmp_path):
    panels = dash.load_panels()
    start = 1_700_000_000.0
    datas = []
    for p in panels:
        d = PanelData(p)
        if p.id % 3:  # some panels with data, some without
            d.add("A", p.targets[0].legend, [Series({"worker_id": "decode-0", "role": "prefill"},
                                                    [(start + i, float(i % 5) / 4) for i in range(60)])])
        else:
            d.add("A", p.targets[0].legend, [])
        datas.append(d)
        write_panel(d, tmp_path / f"{p.slug}.png", start, start + 60, 1.0)
    write_overview(datas, tmp_path / "dashboard.png", start, start + 60, 1.0, "a title")
    for p in panels:
        assert (tmp_path / f"{p.slug}.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "dashboard.png").stat().st_size > 20000
    assert datas[2].empty == ["A"] and not datas[0].empty
