"""How much of the machine a timed part had: CPU used by our processes, by everything else on the
machine, and stolen by the hypervisor, each in cores (CPU seconds / wall seconds). On a shared
2-core machine this says whether a figure was taken with the whole machine or a slice of it."""

from __future__ import annotations

import os
import time

import psutil

_BUSY = ("user", "nice", "system", "irq", "softirq")


class CpuMeter:
    def __init__(self, pids: list[int] | tuple[int, ...] = ()) -> None:
        self.procs = [psutil.Process(p) for p in (os.getpid(), *pids)]
        self.result: dict[str, float] = {}

    def _ours(self) -> float:
        total = 0.0
        for p in self.procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def __enter__(self) -> CpuMeter:
        self._t, self._sys, self._our = time.perf_counter(), psutil.cpu_times(), self._ours()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._t
        now = psutil.cpu_times()
        busy = sum(getattr(now, f) - getattr(self._sys, f) for f in _BUSY)
        ours = self._ours() - self._our
        self.result = {"wall_s": wall, "cores": psutil.cpu_count(), "our_cores": ours / wall,
                       "other_cores": max(0.0, busy - ours) / wall,
                       "steal_cores": (getattr(now, "steal", 0.0) - getattr(self._sys, "steal", 0.0)) / wall}


def describe(result: dict) -> str:
    if not result:
        return "n/a"
    return (f"ours {result['our_cores']:.2f}, others {result['other_cores']:.2f}, "
            f"stolen {result['steal_cores']:.2f} of {result['cores']} cores")
