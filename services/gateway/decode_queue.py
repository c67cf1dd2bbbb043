"""Requests that found every decode worker out of KV blocks (or, under admission control, out of
seats within the TPOT SLO) wait here for room, first come first
served, in a bounded queue, instead of being refused at once (a burst the cluster can serve
within the deadline is served) or queued forever (overload is refused at once).

Only the head of the queue tries to reserve: a request that arrives while others wait joins
behind them, so arrival order holds. The head tries again whenever this gateway frees a
reservation (`freed()`) and at least every `poll_s` (other gateways free blocks too, unseen
here). It leaves the queue when it has its reservation, when its wait budget is spent (its
deadline, or what admission control leaves it before its TTFT SLO), or when it is cancelled;
the next request then becomes the head and tries at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

from common.errors import ResourceExhausted

T = TypeVar("T")


class DecodeQueue:
    def __init__(self, limit: int, poll_s: float = 0.05) -> None:
        if limit < 0:
            raise ValueError(f"the decode queue's limit must be >= 0, got {limit}")
        self.limit = limit
        self.poll_s = poll_s
        self._waiting: deque[object] = deque()  # tickets, arrival order
        self._changed = asyncio.Event()  # a reservation was freed, or the head changed

    def __len__(self) -> int:
        return len(self._waiting)

    def freed(self) -> None:
        """A reservation was released here: the head may fit now."""
        self._wake()

    def _wake(self) -> None:
        # Wake every current waiter; later waits take the fresh event (no wakeup is lost).
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, try_reserve: Callable[[], Awaitable[T | None]], budget_s: float, why: str) -> T:
        """Queue up and call `try_reserve` each time the head may fit, until it returns a
        reservation. ResourceExhausted when the queue is full on arrival or the budget runs out
        (`why`: what the last try said)."""
        if len(self._waiting) >= self.limit:
            raise ResourceExhausted(f"overloaded: {len(self._waiting)} requests already wait for decode KV "
                                    f"(the queue holds {self.limit}); {why}")
        ticket = object()
        self._waiting.append(ticket)
        deadline = time.monotonic() + budget_s
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ResourceExhausted(f"no decode KV or seat freed up within {budget_s:.2f} s in the queue; "
                                            f"{why}")
                try:
                    await asyncio.wait_for(self._changed.wait(), min(left, self.poll_s))
                except TimeoutError:
                    pass
                if self._waiting[0] is not ticket:
                    continue
                got = await try_reserve()
                if got is not None:
                    return got
        finally:
            was_head = self._waiting[0] is ticket
            self._waiting.remove(ticket)
            if was_head and self._waiting:
                self._wake()  # the next one tries at once
