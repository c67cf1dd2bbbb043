"""What the gateway saw since its last load report to the planner. Pure: the caller passes the
clock and ships the interval (services/gateway/server.py reports it every interval; the
virtual-time simulator hands it to the planner's core directly)."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.load import IntervalLoad

# An interval at thousands of requests per second still makes a report of a few hundred KiB at
# most: beyond this many samples per list, later ones are dropped (the counts stay exact).
MAX_SAMPLES = 20_000


@dataclass
class LoadRecorder:
    start: float = 0.0
    _arrivals: int = 0
    _prompt_lens: list[int] = field(default_factory=list)
    _output_lens: list[int] = field(default_factory=list)
    _rejected: int = 0
    _ttft: list[float] = field(default_factory=list)
    _tpot: list[float] = field(default_factory=list)

    def arrived(self, prompt_len: int, max_tokens: int) -> None:
        self._arrivals += 1
        if len(self._prompt_lens) < MAX_SAMPLES:
            self._prompt_lens.append(prompt_len)
            self._output_lens.append(max_tokens)

    def rejected(self) -> None:
        self._rejected += 1

    def refused_by_admission(self, prompt_len: int, max_tokens: int) -> None:
        """A request admission control refused: still demand, counted with its lengths as an
        arrival. Left out, the longest prompts (the ones refused) would vanish from the planner's
        forecast, which would then give prefill fewer workers, and more would be refused."""
        self.arrived(prompt_len, max_tokens)

    def first_token(self, ttft_s: float) -> None:
        if len(self._ttft) < MAX_SAMPLES:
            self._ttft.append(ttft_s)

    def finished(self, tpot_s: float) -> None:
        if len(self._tpot) < MAX_SAMPLES:
            self._tpot.append(tpot_s)

    def take(self, now: float) -> IntervalLoad:
        """The interval [start, now), and a fresh one from now."""
        out = IntervalLoad(self.start, max(0.0, now - self.start), self._arrivals, tuple(self._prompt_lens),
                           tuple(self._output_lens), self._rejected, tuple(self._ttft), tuple(self._tpot))
        self.start, self._arrivals, self._rejected = now, 0, 0
        self._prompt_lens, self._output_lens, self._ttft, self._tpot = [], [], [], []
        return out
