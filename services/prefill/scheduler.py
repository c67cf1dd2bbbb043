"""Prefill batching under a token budget. Pure: no tensors, no I/O.

Prompts are taken first come, first served while their total length fits the budget; a prompt
longer than the whole budget runs alone rather than waiting forever.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

Job = TypeVar("Job")


@dataclass(eq=False)  # identity, not equality: two equal jobs are still two requests
class Queued(Generic[Job]):
    job: Job
    num_tokens: int


class PrefillScheduler(Generic[Job]):
    def __init__(self, token_budget: int) -> None:
        if token_budget < 1:
            raise ValueError("token_budget must be positive")
        self.token_budget = token_budget
        self._queue: deque[Queued[Job]] = deque()

    def add(self, job: Job, num_tokens: int) -> None:
        self._queue.append(Queued(job, num_tokens))

    def remove(self, job: Job) -> bool:
        for item in self._queue:
            if item.job is job:
                self._queue.remove(item)
                return True
        return False

    def schedule(self) -> list[Job]:
        batch: list[Job] = []
        used = 0
        while self._queue:
            nxt = self._queue[0].num_tokens
            if batch and used + nxt > self.token_budget:
                break
            batch.append(self._queue.popleft().job)
            used += nxt
        return batch

    @property
    def num_waiting(self) -> int:
        return len(self._queue)

    @property
    def tokens_waiting(self) -> int:
        return sum(item.num_tokens for item in self._queue)
