"""The live-migration protocol and the order of a decode worker's evacuation, pure (no I/O, no
clock). Two drivers run them: the worker (services/decode/migration.py and
services/worker/role_switch.py, async over PushKV) and the virtual-time simulator
(services/simulate/switching.py), so both move requests the same way.

One move (`MovePlan`):
    Send(a, b)     pre-copy: positions [a, b) (the KV written so far) while the request decodes
                   on; up to PRECOPY_ROUNDS rounds, each sending what was written meanwhile
    Pause          take the request out of the batch after the step it may be in
    HandOver(a, b) the tail [a, b) written during the last round, then `end` with the tokens so
                   far; the target adopts the request and decodes on

The evacuation: every request that is decoding (READY, RUNNING) moves, each to the target with the
most free blocks that can hold its whole reservation; one still waiting for its KV moves once the
KV lands; one that no target can hold finishes where it is. The worker is empty when no request
is left and no move is in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from services.decode.scheduler import DecodeSeq, SeqState

PRECOPY_ROUNDS = 2


@dataclass(frozen=True)
class Send:
    start: int
    end: int


@dataclass(frozen=True)
class Pause:
    pass


@dataclass(frozen=True)
class HandOver:
    start: int  # the tail: positions written since the last Send
    end: int    # every position with KV (prompt_len + tokens so far - 1)


@dataclass
class MovePlan:
    copied: int = 0  # positions sent so far
    rounds: int = 0
    paused: bool = False

    def next(self, written: int) -> Send | Pause | HandOver:
        """The next step, given the positions the request has written (`seq.next_position`)."""
        if not self.paused:
            if self.rounds < PRECOPY_ROUNDS and written > self.copied:
                step = Send(self.copied, written)
                self.copied, self.rounds = written, self.rounds + 1
                return step
            return Pause()
        step = HandOver(self.copied, written)
        self.copied = written
        return step

    def on_paused(self) -> None:
        self.paused = True


def movable(seqs: Iterable[DecodeSeq], skip: Callable[[str], bool]) -> list[DecodeSeq]:
    """The requests to start moving now: decoding, and not `skip`ped (moving already, or stuck)."""
    return [s for s in seqs if s.state in (SeqState.READY, SeqState.RUNNING) and not skip(s.request_id)]


T = TypeVar("T")


def targets_in_order(targets: Iterable[T], blocks_needed: int, free_blocks: Callable[[T], int],
                     name: Callable[[T], str]) -> list[T]:
    """The targets that can hold a request's whole reservation, most free blocks first (ties by
    name, so that runs repeat)."""
    return sorted((t for t in targets if free_blocks(t) >= blocks_needed), key=lambda t: (-free_blocks(t), name(t)))
