"""DOPD's short path in the gateway: the asyncio side of the pure ShortBatcher
(services/gateway/scheduling.py). A short prompt is held while every prefill worker has work
outstanding, and released, with the others held, when one frees (late binding), when their
tokens reach the cap, or when the oldest has waited the wait cap. A released batch goes to one
prefill worker, chosen at release: each waiter learns its id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from services.gateway.scheduling import ShortBatcher


class ShortGate:
    def __init__(self, choose_worker: Callable[[], str | None], clock: Callable[[], float],
                 seconds_per_profile_second: float = 1.0) -> None:
        self.choose_worker = choose_worker  # the least loaded prefill worker now (None: none)
        self.clock = clock
        self.scale = seconds_per_profile_second  # the caps are profile seconds; the clock is wall
        self.batcher = ShortBatcher(token_cap=1, wait_cap_s=0.0)
        self._timer: asyncio.TimerHandle | None = None

    def set_caps(self, token_cap: int, wait_cap_s: float) -> None:
        """The policy's caps for this interval; prompts held keep their place."""
        self.batcher.token_cap, self.batcher.wait_cap_s = token_cap, wait_cap_s * self.scale
        self._arm()

    async def hold(self, tokens: int) -> str | None:
        """Wait for this prompt's batch; the prefill worker it goes to (None: pick as usual)."""
        waiter = asyncio.get_running_loop().create_future()
        batch = self.batcher.add(waiter, tokens, self.clock())
        if batch:
            self._release(batch)
        else:
            self._arm()
        try:
            return await waiter
        except asyncio.CancelledError:
            self.batcher.remove(waiter)
            raise

    def worker_freed(self) -> None:
        """A prefill worker has nothing outstanding any more: what is held goes to it now."""
        self._release(self.batcher.flush())

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        due = self.batcher.due()
        if due is not None:
            self._timer = asyncio.get_running_loop().call_later(max(0.0, due - self.clock()), self._poll)

    def _poll(self) -> None:
        self._timer = None
        batch = self.batcher.poll(self.clock())
        if batch:
            self._release(batch)
        self._arm()

    def _release(self, batch: list) -> None:
        if not batch:
            return
        worker = self.choose_worker()
        for waiter in batch:
            if not waiter.done():
                waiter.set_result(worker)
        self._arm()

    def __len__(self) -> int:
        return len(self.batcher)
