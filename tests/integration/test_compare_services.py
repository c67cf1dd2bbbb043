"""`dopd bench compare` on the real services (the sim engine): each mode's cluster is brought up,
run and taken down by the command, and the dopd run reports the planner's role switches."""

from __future__ import annotations

import asyncio
import json

from services.cli import main as dopd


async def test_compare_on_the_sim_engine_brings_up_each_mode_and_counts_switches(tmp_path, monkeypatch,
                                                                                   redis_url):
    monkeypatch.setenv("DOPD_REDIS_URL", redis_url)
    out = tmp_path / "cmp"
    argv = ["bench", "compare", "--modes", "static,dopd", "--engine", "sim", "--profile", "llama3-8b-h100",
            "--workers", "2", "--static-splits", "1:1", "--workload", "mix", "--rate", "2", "--duration", "2",
            "--time-scale", "4", "--slo-ttft", "2000", "--slo-tpot", "200", "--out", str(out), "--no-progress"]
    assert await asyncio.to_thread(dopd, argv) == 0
    doc = json.loads((out / "compare.json").read_text())
    for mode in ("static", "dopd"):
        f = doc["modes"][mode]
        assert f["engine"] == "sim" and f["requests"] > 0
        assert f["completed"] + f["refused"] + f["failed"] == f["requests"], mode
    # Counted from the planner's metric (0 is a count; None would mean it was not read).
    assert isinstance(doc["modes"]["dopd"]["switches"], int)
    # dopd's split over time, from the gateway status samples the benchmark took.
    assert (out / "dopd_split.png").stat().st_size > 0

    # --reuse adds a mode to the same comparison: static and dopd are read back, not served again.
    served = {mode: (out / d / "requests.jsonl").stat().st_mtime_ns for mode, d in (("static", "static-1p1d"),
                                                                                 ("dopd", "dopd"))}
    more = [*argv[:3], "static,dopd,dopd-no-planner", *argv[4:], "--reuse"]
    assert await asyncio.to_thread(dopd, more) == 0
    again = json.loads((out / "compare.json").read_text())
    assert list(again["modes"]) == ["static", "dopd", "dopd-no-planner"]
    for mode, d in (("static", "static-1p1d"), ("dopd", "dopd")):
        assert (out / d / "requests.jsonl").stat().st_mtime_ns == served[mode]
        assert again["modes"][mode] == doc["modes"][mode], mode
    assert again["modes"]["dopd-no-planner"]["requests"] == doc["modes"]["dopd"]["requests"]
    # ... and only runs of the same workload: another rate is refused (bad arguments: 2).
    other = [*more[:more.index("--rate") + 1], "3", *more[more.index("--rate") + 2:]]
    assert await asyncio.to_thread(dopd, other) == 2
