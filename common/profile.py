"""Latency profiles: how long prefill and decode take for a model on a device, and how many KV
bytes a token makes. The `sim` engine runs on them; `dopd profile` measures one on the real
engine; shipped ones live in common/profiles/NAME.json. Pure: no I/O but the loader.

File format (JSON):

    {
      "name": "llama3-8b-h100",
      "description": "...", "sources": ["..."], "assumptions": ["..."],
      "model": {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128, "dtype": "bfloat16",
                "vocab_size": 128256, "max_context": 8192},
      "prefill": {"tokens": [128, 512, ...], "seconds": [0.01, 0.03, ...]},
      "decode": {"batch": [1, 8, ...], "context": [128, 1024, ...],
                 "seconds": [[...per context...] per batch]},
      "link_gbps": 400   (optional: one worker's KV link, for the virtual-time simulator)
    }

`prefill.seconds[i]` is the time of one forward over `tokens[i]` prompt tokens in total (a batch
of prompts costs what their total costs: the curve is convex in the total). `decode.seconds[b][c]`
is one step of a batch of `batch[b]` requests whose mean context is `context[c]`. Between grid
points the time is interpolated linearly (bilinearly for decode); beyond the grid it is
extrapolated from the last two points, never below zero.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"


@dataclass(frozen=True)
class ProfiledModel:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    vocab_size: int
    max_context: int

    @property
    def kv_bytes_per_token(self) -> int:
        itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[self.dtype]
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear through (xs, ys), extrapolated from the end segments, clamped at 0."""
    if len(xs) == 1:
        return max(0.0, ys[0])
    i = min(max(bisect.bisect_right(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclass(frozen=True)
class LatencyProfile:
    name: str
    model: ProfiledModel
    prefill_tokens: tuple[float, ...]
    prefill_seconds: tuple[float, ...]
    decode_batch: tuple[float, ...]
    decode_context: tuple[float, ...]
    decode_seconds: tuple[tuple[float, ...], ...]
    description: str = ""
    # The KV link one worker of this hardware has, Gb/s (optional; the virtual-time simulator's
    # default link, services/simulate/hardware.py).
    link_gbps: float | None = None

    def prefill_time(self, total_tokens: int) -> float:
        return _interp(list(self.prefill_tokens), list(self.prefill_seconds), total_tokens)

    def decode_step_time(self, batch_size: int, mean_context: float) -> float:
        per_batch = [_interp(list(self.decode_context), list(row), mean_context) for row in self.decode_seconds]
        return _interp(list(self.decode_batch), per_batch, batch_size)

    def batch_monotone(self) -> LatencyProfile:
        """This profile with each context's decode step time made non-decreasing in the batch (the
        slowest of every batch up to it). A bigger batch never steps faster, whatever a measured
        grid says (smollm2-cpu2's, measured under load, dips from batch 16 to 32 at 512 tokens):
        what limits a batch by the TPOT SLO uses this, so that a dip never allows a batch that a
        smaller one already ruled out."""
        rows, slowest = [], [0.0] * len(self.decode_context)
        for row in self.decode_seconds:
            slowest = [max(a, b) for a, b in zip(slowest, row, strict=True)]
            rows.append(tuple(slowest))
        return dataclasses.replace(self, decode_seconds=tuple(rows))

    def largest_batch_within(self, seconds: float, mean_context: float, cap: int) -> int:
        """The largest batch, at most `cap`, whose decode step at `mean_context` takes at most
        `seconds` (0: not even one). Bisects, so the step must not fall as the batch grows: call it
        on `batch_monotone()`."""
        def fits(batch: int) -> bool:
            return self.decode_step_time(batch, mean_context) <= seconds
        if fits(cap):
            return cap
        low, high = 0, cap  # fits(low) or low == 0; not fits(high)
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        return low

    def mixed_step_time(self, decode_batch: int, mean_context: float, prefill_tokens: int) -> float:
        """One forward that decodes `decode_batch` requests and prefills `prefill_tokens` prompt
        tokens together (chunked prefill). The weights are read once and every token goes through
        the linear layers: the prefill of all the tokens. On top, the decodes' attention over their
        contexts: what a decode step of that batch costs beyond one at the smallest profiled
        context. A modelling choice, stated in common/profiles/README.md."""
        if prefill_tokens <= 0:
            return self.decode_step_time(decode_batch, mean_context)
        if decode_batch <= 0:
            return self.prefill_time(prefill_tokens)
        attention = self.decode_step_time(decode_batch, mean_context) - self.decode_step_time(
            decode_batch, self.decode_context[0])
        return self.prefill_time(prefill_tokens + decode_batch) + max(0.0, attention)

    @classmethod
    def from_dict(cls, doc: dict) -> LatencyProfile:
        try:
            model = ProfiledModel(**doc["model"])
            prefill, decode = doc["prefill"], doc["decode"]
            profile = cls(
                name=doc["name"], model=model, description=doc.get("description", ""),
                link_gbps=float(doc["link_gbps"]) if doc.get("link_gbps") is not None else None,
                prefill_tokens=tuple(prefill["tokens"]), prefill_seconds=tuple(prefill["seconds"]),
                decode_batch=tuple(decode["batch"]), decode_context=tuple(decode["context"]),
                decode_seconds=tuple(tuple(row) for row in decode["seconds"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a latency profile: {exc}") from None
        profile._check()
        return profile

    def _check(self) -> None:
        if self.link_gbps is not None and not self.link_gbps > 0:
            raise ValueError(f"profile {self.name}: link_gbps must be > 0, got {self.link_gbps}")
        for label, xs in (("prefill.tokens", self.prefill_tokens), ("decode.batch", self.decode_batch),
                          ("decode.context", self.decode_context)):
            if not xs or list(xs) != sorted(set(xs)):
                raise ValueError(f"profile {self.name}: {label} must be non-empty and strictly increasing")
        if len(self.prefill_seconds) != len(self.prefill_tokens):
            raise ValueError(f"profile {self.name}: prefill.seconds must match prefill.tokens")
        if len(self.decode_seconds) != len(self.decode_batch) or any(
                len(row) != len(self.decode_context) for row in self.decode_seconds):
            raise ValueError(f"profile {self.name}: decode.seconds must be [batch][context]")


def serving_profile_name(model: str, explicit: str = "") -> str:
    """The profile the planner and the gateway's policy reason with for a cluster of `model`:
    the one given, the sim engine's own, or smollm2-cpu2 (the real engine on these machines;
    tiny-random and fake have the same shape)."""
    if explicit:
        return explicit
    if model.startswith("sim:"):
        return model.removeprefix("sim:")
    return "smollm2-cpu2"


def list_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(name_or_path: str) -> LatencyProfile:
    """A shipped profile by name, or a profile file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.json"
    if not path.exists():
        raise FileNotFoundError(f"no latency profile {name_or_path!r}; shipped: {', '.join(list_profiles())}")
    return LatencyProfile.from_dict(json.loads(path.read_text()))
