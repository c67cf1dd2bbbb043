"""The virtual clock: a heap of (time, sequence, callback, args). Pure and deterministic: events
at the same time run in the order they were scheduled."""

from __future__ import annotations

import heapq
from collections.abc import Callable


class EventLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self.processed = 0
        self._heap: list[tuple[float, int, Callable, tuple]] = []
        self._seq = 0

    def at(self, t: float, fn: Callable, *args) -> None:
        """Run fn(*args) at virtual time t (never before now)."""
        if t < self.now:
            raise ValueError(f"event at {t} is in the past (now {self.now})")
        heapq.heappush(self._heap, (t, self._seq, fn, args))
        self._seq += 1

    def after(self, delay: float, fn: Callable, *args) -> None:
        self.at(self.now + delay, fn, *args)

    def run(self) -> None:
        """Until no event is left."""
        heap, pop = self._heap, heapq.heappop
        n = 0
        while heap:
            t, _, fn, args = pop(heap)
            self.now = t
            fn(*args)
            n += 1
        self.processed += n

    def __len__(self) -> int:
        return len(self._heap)
