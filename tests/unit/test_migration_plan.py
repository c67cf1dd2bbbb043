"""The live-migration protocol's pure core (services/decode/migration_plan.py), which the worker
and the simulator both drive."""

from __future__ import annotations

from dataclasses import dataclass

from common.types import SamplingParams
from services.decode.migration_plan import (
    PRECOPY_ROUNDS,
    HandOver,
    MovePlan,
    Pause,
    Send,
    movable,
    targets_in_order,
)
from services.decode.scheduler import DecodeSeq, SeqState


def test_pre_copy_rounds_then_pause_then_the_tail():
    assert PRECOPY_ROUNDS == 2
    plan = MovePlan()
    assert plan.next(100) == Send(0, 100)  # what was written so far
    assert plan.next(103) == Send(100, 103)  # what was written meanwhile
    assert plan.next(104) == Pause()  # no more rounds: pause, whatever was written
    assert plan.next(104) == Pause()  # until the driver says it paused
    plan.on_paused()
    assert plan.next(105) == HandOver(103, 105)  # the step in flight wrote one more
    assert plan.copied == 105


def test_nothing_new_written_pauses_at_once():
    plan = MovePlan()
    assert plan.next(50) == Send(0, 50)
    assert plan.next(50) == Pause()  # a fast copy: no step ended meanwhile, no second round
    plan.on_paused()
    assert plan.next(50) == HandOver(50, 50)  # an empty tail; `end` still carries the tokens


def _seq(rid: str, state: SeqState) -> DecodeSeq:
    seq = DecodeSeq(rid, 4, SamplingParams(max_tokens=8))
    seq.state = state
    return seq


def test_decoding_requests_move_the_rest_wait_or_are_skipped():
    seqs = [_seq("a", SeqState.RUNNING), _seq("b", SeqState.READY), _seq("c", SeqState.WAITING_KV),
            _seq("d", SeqState.RUNNING), _seq("e", SeqState.PAUSED)]
    assert [s.request_id for s in movable(seqs, skip=lambda rid: rid == "d")] == ["a", "b"]


@dataclass
class T:
    name: str
    free: int


def test_targets_with_room_most_free_first_ties_by_name():
    targets = [T("w3", 10), T("w1", 40), T("w2", 40), T("w4", 9)]
    ordered = targets_in_order(targets, 10, lambda t: t.free, lambda t: t.name)
    assert [t.name for t in ordered] == ["w1", "w2", "w3"]  # w4 cannot hold 10 blocks
    assert targets_in_order(targets, 41, lambda t: t.free, lambda t: t.name) == []
