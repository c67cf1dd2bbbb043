"""What the simulator takes from the hardware besides the latency profile: the link that KV
crosses, and a faster way to ask the profile for a decode step's time. Pure.

Link bandwidth (`--link-gbps`), in this order: the profile's own `link_gbps` (common/profile.py);
the table LINK_GBPS by profile name; 8 Gb/s for a profile whose name says `cpu`; else 400 Gb/s
(one H100-class GPU's RDMA NIC, e.g. ConnectX-7 NDR).

Each worker has one outgoing link, a FIFO: a transfer starts when the previous one has left.
Incoming links, switches and per-message latencies are not modelled.
"""

from __future__ import annotations

import bisect

from common.profile import LatencyProfile

DEFAULT_GPU_LINK_GBPS = 400.0
DEFAULT_CPU_LINK_GBPS = 8.0
LINK_GBPS = {
    "llama3-8b-h100": 400.0,  # ConnectX-7 NDR, one 400 Gb/s NIC per H100 (DGX H100)
    "smollm2-cpu2": 8.0,  # two CPU processes over loopback/Ethernet: ~1 GB/s
    "zero": 400.0,
}


def default_link_gbps(profile: LatencyProfile) -> float:
    """The link bandwidth for a profile (see the module docstring)."""
    if profile.link_gbps is not None:
        return profile.link_gbps
    if profile.name in LINK_GBPS:
        return LINK_GBPS[profile.name]
    return DEFAULT_CPU_LINK_GBPS if "cpu" in profile.name.lower() else DEFAULT_GPU_LINK_GBPS


class Link:
    """One worker's outgoing link, first come first served."""

    def __init__(self, gbps: float) -> None:
        if not gbps > 0:
            raise ValueError(f"link bandwidth must be > 0 Gb/s, got {gbps}")
        self.bytes_per_s = gbps * 1e9 / 8
        self.free_at = 0.0
        self.bytes_sent = 0

    def send(self, now: float, nbytes: int) -> float:
        """A transfer of nbytes handed to the link at `now`: when its last byte has left."""
        start = max(now, self.free_at)
        self.free_at = start + nbytes / self.bytes_per_s
        self.bytes_sent += nbytes
        return self.free_at

    def stream_layers(self, start: float, forward_s: float, nbytes: int, layers: int) -> float:
        """A prefill forward from `start` that makes nbytes of KV in `layers` equal parts, one as
        each layer ends (start + (l + 1) * forward_s / layers), each sent as soon as it is made
        and the link is free: when the last byte has left. Closed form of that FIFO: the last
        layer's own bytes after the forward, or the whole lot once the first layer is out, or
        once the link is free of earlier transfers, whichever is latest."""
        layers = max(1, layers)
        whole = nbytes / self.bytes_per_s
        per_layer = whole / layers
        done = max(self.free_at + whole, start + forward_s / layers + whole, start + forward_s + per_layer)
        self.free_at = done
        self.bytes_sent += nbytes
        return done


class StepTimer:
    """profile.decode_step_time, memoised per batch size. For one batch size the profile's
    bilinear interpolation is piecewise linear in the context with knots at the profile's context
    grid, so its values at those knots give it exactly inside the grid. Outside the grid, and for
    a batch size where the profile clamps a knot at 0, the profile itself is asked."""

    def __init__(self, profile: LatencyProfile) -> None:
        self.profile = profile
        self.xs = [float(x) for x in profile.decode_context]
        self._rows: dict[int, list[float] | None] = {}

    def __call__(self, batch: int, context: float) -> float:
        xs = self.xs
        if len(xs) < 2 or not xs[0] <= context <= xs[-1]:
            return self.profile.decode_step_time(batch, context)
        row = self._rows.get(batch, False)
        if row is False:
            row = [self.profile.decode_step_time(batch, x) for x in xs]
            row = self._rows[batch] = row if min(row) > 0 else None
        if row is None:
            return self.profile.decode_step_time(batch, context)
        i = min(bisect.bisect_right(xs, context), len(xs) - 1)
        x0, x1 = xs[i - 1], xs[i]
        return row[i - 1] + (row[i] - row[i - 1]) * (context - x0) / (x1 - x0)
