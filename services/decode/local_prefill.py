"""Prompts prefilled on the decode worker itself, in chunks that share each decode step's
forward: chunked prefill, as vLLM schedules it. Pure: no tensors, no I/O.

Used for every request in `aggregated` mode, and for DOPD's ultra-short path (a prompt too short
to be worth moving its KV). Each step the worker decodes its running batch and takes prompt
tokens first come first served up to the step's token budget, less one token per request it
decodes: the head prompt continues where its last chunk ended, and a prompt is done (its KV is
in this worker's pool, its first token sampled) at the end of the step that ran its last chunk.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

Job = TypeVar("Job")


@dataclass(eq=False)  # identity: two equal jobs are still two requests
class _Prompt(Generic[Job]):
    job: Job
    tokens: int
    done: int = 0  # tokens already taken into a step


@dataclass(frozen=True)
class Chunk(Generic[Job]):
    job: Job
    start: int
    end: int
    last: bool  # the prompt's KV is complete when this chunk's step ends


class LocalPrefill(Generic[Job]):
    def __init__(self, step_token_budget: int) -> None:
        if step_token_budget < 1:
            raise ValueError("step_token_budget must be positive")
        self.step_token_budget = step_token_budget
        self._queue: deque[_Prompt[Job]] = deque()

    def add(self, job: Job, tokens: int) -> None:
        if tokens < 1:
            raise ValueError("a prompt has at least one token")
        self._queue.append(_Prompt(job, tokens))

    def remove(self, job: Job) -> bool:
        """A prompt whose request ended (timed out, cancelled); a chunk of it already in a step
        runs for nothing."""
        for p in self._queue:
            if p.job is job:
                self._queue.remove(p)
                return True
        return False

    def take(self, decoding: int) -> list[Chunk[Job]]:
        """The chunks for a step that also decodes `decoding` requests. At least one token is
        taken when any prompt waits, so prefill never starves behind a full decode batch."""
        budget = max(1, self.step_token_budget - decoding)
        chunks: list[Chunk[Job]] = []
        while self._queue and budget > 0:
            p = self._queue[0]
            n = min(budget, p.tokens - p.done)
            chunks.append(Chunk(p.job, p.done, p.done + n, p.done + n == p.tokens))
            p.done += n
            budget -= n
            if p.done == p.tokens:
                self._queue.popleft()
        return chunks

    @property
    def num_waiting(self) -> int:
        return len(self._queue)

    @property
    def tokens_waiting(self) -> int:
        return sum(p.tokens - p.done for p in self._queue)

    def __bool__(self) -> bool:
        return bool(self._queue)
