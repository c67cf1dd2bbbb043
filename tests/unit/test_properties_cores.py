"""Property and stateful tests (hypothesis) of the pure cores that take their input from outside
their process (a request's sizes, a peer's calls, the engine's order of calls):

- BlockPool: random allocate / free sequences, over-allocation, double and foreign frees. The
  free list and the lent blocks always partition [0, num_blocks); no block is lent twice; a
  refused call leaves the pool as it was; everything is free at the end.
- DecodeScheduler: random reserve / kv_complete / kv_complete_migrated / begin_step + end_step
  (random tokens, EOS included) / also_in_step / abandon_step / pause / pause_or_defer / resume /
  abort / release, legal and illegal, in the orders the engine may call them (one step in flight
  at a time; during a step only the deferring calls). Illegal calls raise (KeyError for an
  unknown id, ValueError for the wrong state, OutOfBlocks) and change nothing; the block tables
  and the pool agree after every call; at the end every request is released and every block is
  free (the leak check).
- PrefillScheduler: FIFO batches under the token budget (over it only alone), maximal, nothing
  lost or duplicated, remove by identity.
- LocalPrefill: each step's chunks fit its budget (at least one token when a prompt waits), each
  prompt is covered exactly once in order, `last` exactly on its last chunk.
- ShortBatcher and PrefillLedger (services/gateway/scheduling.py): batches FIFO under the cap,
  released by the cap, the wait cap or a flush, every prompt exactly once; the ledger's tokens
  and busy times are the sums and minima of what is outstanding.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from common.kv.block_pool import BlockPool, OutOfBlocks, kv_tokens_for
from common.types import SamplingParams
from services.decode.local_prefill import LocalPrefill
from services.decode.scheduler import DecodeScheduler, DecodeSeq, Finish, SeqState
from services.gateway.scheduling import PrefillLedger, ShortBatcher
from services.prefill.scheduler import PrefillScheduler

# database=None: no .hypothesis directory left behind; a failure prints how to reproduce it.
MACHINE_SETTINGS = settings(max_examples=200, stateful_step_count=50, deadline=None, database=None,
                            suppress_health_check=[HealthCheck.too_slow])
GIVEN_SETTINGS = settings(max_examples=200, deadline=None, database=None)


# -- BlockPool -------------------------------------------------------------------------------------

def pool_state(pool: BlockPool) -> tuple[list[int], frozenset[int]]:
    """The free list (in order: it is a stack) and the lent set. Private, read only: the pool has
    no public view of which ids it lent, and "a refused call changes nothing" needs it."""
    return list(pool._free), frozenset(pool._used)


def check_pool(pool: BlockPool) -> None:
    free, used = pool_state(pool)
    assert pool.num_free + pool.num_used == pool.num_blocks
    assert len(set(free)) == len(free), f"a block is twice in the free list: {free}"
    assert not set(free) & used, f"blocks both free and lent: {set(free) & used}"
    assert set(free) | used == set(range(pool.num_blocks))


class BlockPoolMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(1, 24), block_size=st.integers(1, 32))
    def make(self, num_blocks, block_size):
        self.pool = BlockPool(num_blocks, block_size)
        self.held: list[list[int]] = []  # the allocations still out, as their callers hold them
        self.returned: list[int] = []  # ids freed earlier (for double frees)

    def lent(self) -> set[int]:
        return {b for blocks in self.held for b in blocks}

    def refused(self, call, exc_type, match: str) -> None:
        before = pool_state(self.pool)
        with pytest.raises(exc_type, match=match):
            call()
        assert pool_state(self.pool) == before, "a refused call changed the pool"

    @rule(n=st.integers(0, 30))
    def allocate(self, n):
        if n > self.pool.num_free:
            self.refused(lambda: self.pool.allocate(n), OutOfBlocks, rf"need {n} KV blocks, {self.pool.num_free} of")
            event("pool: over-allocation refused")
            return
        blocks = self.pool.allocate(n)
        assert len(blocks) == n == len(set(blocks))
        assert all(0 <= b < self.pool.num_blocks for b in blocks)
        assert not set(blocks) & self.lent(), "a block was lent twice"
        self.held.append(blocks)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def free_some(self, data):
        """Free all of one allocation, or part of it (a caller may give back a prefix or any subset)."""
        i = data.draw(st.integers(0, len(self.held) - 1))
        blocks = self.held[i]
        part = data.draw(st.lists(st.sampled_from(blocks), unique=True) if blocks else st.just([]))
        self.pool.free(part)
        self.held[i] = [b for b in blocks if b not in part]
        self.returned += part

    @precondition(lambda self: self.returned)
    @rule(data=st.data())
    def double_free(self, data):
        block = data.draw(st.sampled_from(self.returned))
        if block in self.lent():
            return  # lent again since: a legal free
        self.refused(lambda: self.pool.free([block]), ValueError, f"block {block} freed but not in use")

    @rule(block=st.integers(-5, 40))
    def foreign_free(self, block):
        if block in self.lent():
            return
        self.refused(lambda: self.pool.free([block]), ValueError, "not in use")

    @precondition(lambda self: self.lent())
    @rule(data=st.data(), bad=st.integers(-3, 40))
    def free_with_a_bad_id(self, data, bad):
        """A list with lent ids and one that is not: the call raises. Whatever it freed before
        raising (it is not atomic: see test_a_failed_free_changes_nothing), the pool stays
        consistent and frees nothing it had not lent."""
        if bad in self.lent():
            return
        good = data.draw(st.lists(st.sampled_from(sorted(self.lent())), unique=True, min_size=1))
        position = data.draw(st.integers(0, len(good)))
        call = good[:position] + [bad] + good[position:]
        _, used_before = pool_state(self.pool)
        with pytest.raises(ValueError, match="not in use"):
            self.pool.free(call)
        _, used_after = pool_state(self.pool)
        gone = used_before - used_after
        event(f"pool: a failed free freed {'some' if gone else 'nothing'}")
        assert gone <= set(good) and used_after <= used_before
        self.held = [[b for b in blocks if b not in gone] for blocks in self.held]
        self.returned += sorted(gone)

    @invariant()
    def consistent(self):
        check_pool(self.pool)
        _, used = pool_state(self.pool)
        assert used == self.lent()
        assert sum(len(b) for b in self.held) == len(self.lent()), "allocations overlap"

    def teardown(self):
        for blocks in self.held:
            self.pool.free(blocks)
        assert self.pool.num_free == self.pool.num_blocks and self.pool.num_used == 0
        check_pool(self.pool)


TestBlockPoolMachine = BlockPoolMachine.TestCase
TestBlockPoolMachine.settings = MACHINE_SETTINGS


def test_a_failed_free_changes_nothing():
    pool = BlockPool(4, 4)
    [a] = pool.allocate(1)
    with pytest.raises(ValueError):
        pool.free([999, a])
    assert pool.num_used == 1, "the valid block of a refused free was freed anyway"


# -- DecodeScheduler -------------------------------------------------------------------------------

EOS = 2
IDS = st.sampled_from(["a", "b", "c", "d", "e", "f"])
TOKENS = st.integers(0, 6)  # 2 is EOS
NON_STOP_TOKENS = st.integers(3, 9)


def sched_state(s: DecodeScheduler):
    """Everything a refused call must leave as it was (private state, read only)."""
    seqs = {rid: (id(seq), seq.state, tuple(seq.tokens), tuple(seq.block_table), seq.finish)
            for rid, seq in s.seqs.items()}
    return (pool_state(s.pool), seqs, list(s._ready), list(s._running), set(s._in_step), set(s._releases),
            set(s._pauses))


class DecodeSchedulerMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(1, 40), block_size=st.integers(1, 8), max_batch=st.integers(1, 4))
    def make(self, num_blocks, block_size, max_batch):
        self.pool = BlockPool(num_blocks, block_size)
        self.sched = DecodeScheduler(self.pool, max_batch)
        self.step: list[DecodeSeq] | None = None  # the batch of the step in flight
        self.step_also: set[str] = set()  # requests whose prompt chunks the step writes
        self.deferred_releases: set[str] = set()
        self.deferred_pauses: set[str] = set()
        self.ended: list[DecodeSeq] = []  # every request that left the scheduler

    # -- helpers
    def in_step(self, rid: str) -> bool:
        return self.step is not None and (rid in {s.request_id for s in self.step} or rid in self.step_also)

    def refused(self, call, exc_type, match: str | None = None) -> None:
        before = sched_state(self.sched)
        with pytest.raises(exc_type, match=match):
            call()
        assert sched_state(self.sched) == before, "a refused call changed the scheduler"

    def note_ended(self, seq: DecodeSeq | None) -> None:
        if seq is not None and seq.state is SeqState.FINISHED and all(seq is not e for e in self.ended):
            self.ended.append(seq)

    def pick(self, data) -> str:
        """A request id: mostly one the scheduler holds, sometimes any (unknown ids included)."""
        held = sorted(self.sched.seqs)
        return data.draw(st.sampled_from(held) | st.sampled_from(held) | IDS if held else IDS, label="rid")

    def live(self, *states: SeqState) -> list[str]:
        return sorted(rid for rid, seq in self.sched.seqs.items() if not states or seq.state in states)

    # -- admission
    @rule(rid=IDS, prompt_len=st.integers(1, 16), max_tokens=st.integers(1, 8), eos=st.booleans())
    def reserve(self, rid, prompt_len, max_tokens, eos):
        params = SamplingParams(max_tokens=max_tokens, stop_token_ids=frozenset([EOS]) if eos else frozenset())
        seq = DecodeSeq(rid, prompt_len, params)
        needed = self.pool.blocks_for(kv_tokens_for(prompt_len, max_tokens))
        if rid in self.sched.seqs:
            self.refused(lambda: self.sched.reserve(seq), ValueError, "already on this worker")
        elif needed > self.pool.num_free:
            self.refused(lambda: self.sched.reserve(seq), OutOfBlocks, "KV blocks")
            event("decode: reserve refused, out of blocks")
        else:
            self.sched.reserve(seq)
            assert seq.state is SeqState.WAITING_KV and len(seq.block_table) == needed
            assert self.sched.seqs[rid] is seq

    @rule(rid=IDS, prompt_len=st.integers(1, 8), max_tokens=st.integers(2, 8), token=NON_STOP_TOKENS)
    def reserve_and_complete(self, rid, prompt_len, max_tokens, token):
        """The usual life's start, in one rule so that runs reach the batch often: a new request
        reserved and its KV in."""
        if rid in self.sched.seqs:
            return
        seq = DecodeSeq(rid, prompt_len, SamplingParams(max_tokens=max_tokens, stop_token_ids=frozenset([EOS])))
        if self.pool.blocks_for(kv_tokens_for(prompt_len, max_tokens)) > self.pool.num_free:
            return
        self.sched.reserve(seq)
        assert self.sched.kv_complete(rid, token) is seq and seq.state is SeqState.READY

    @rule(data=st.data(), token=TOKENS)
    def kv_complete(self, data, token):
        rid = self.pick(data)
        seq = self.sched.seqs.get(rid)
        if seq is None:
            self.refused(lambda: self.sched.kv_complete(rid, token), KeyError)
        elif seq.state is not SeqState.WAITING_KV:
            self.refused(lambda: self.sched.kv_complete(rid, token), ValueError, "already has its KV")
        elif rid in self.step_also:
            return  # its prompt's chunk is in the step: its KV completes when the step ends
        else:
            self.sched.kv_complete(rid, token)
            assert seq.tokens == [token]
            if token in seq.params.stop_token_ids:
                assert (seq.state, seq.finish) == (SeqState.FINISHED, Finish.STOP)
            elif seq.params.max_tokens == 1:
                assert (seq.state, seq.finish) == (SeqState.FINISHED, Finish.LENGTH)
            else:
                assert seq.state is SeqState.READY
            self.note_ended(seq)

    @rule(data=st.data(), tokens=st.lists(NON_STOP_TOKENS, max_size=9))
    def kv_complete_migrated(self, data, tokens):
        rid = self.pick(data)
        seq = self.sched.seqs.get(rid)
        if seq is None:
            self.refused(lambda: self.sched.kv_complete_migrated(rid, tokens), KeyError)
        elif seq.state is not SeqState.WAITING_KV:
            self.refused(lambda: self.sched.kv_complete_migrated(rid, tokens), ValueError, "already has its KV")
        elif not 1 <= len(tokens) < seq.params.max_tokens:
            self.refused(lambda: self.sched.kv_complete_migrated(rid, tokens), ValueError, "a migrated request")
        elif rid in self.step_also:
            return
        else:
            self.sched.kv_complete_migrated(rid, tokens)
            assert seq.state is SeqState.READY and seq.tokens == tokens

    # -- steps: one in flight at a time, as the engine runs them
    @precondition(lambda self: self.step is None and self.sched.seqs)  # the engine steps when it has work
    @rule()
    def begin_step(self):
        running = [rid for rid, s in self.sched.seqs.items() if s.state is SeqState.RUNNING]
        ready = list(self.sched._ready)
        batch = self.sched.begin_step()
        ids = [s.request_id for s in batch]
        expected = running + ready[:max(0, self.sched.max_batch_size - len(running))]
        assert sorted(ids) == sorted(expected), "the batch is the running requests topped up from the ready queue, FIFO"
        assert len(ids) == len(set(ids)) <= self.sched.max_batch_size
        assert all(s.state is SeqState.RUNNING for s in batch)
        self.step = batch

    @precondition(lambda self: self.step is not None)
    @rule(data=st.data())
    def also_in_step(self, data):
        waiting = self.live(SeqState.WAITING_KV)
        if not waiting:
            return
        rids = data.draw(st.lists(st.sampled_from(waiting), unique=True, min_size=1))
        self.sched.also_in_step(rids)
        self.step_also |= set(rids)

    @precondition(lambda self: self.step is not None)
    @rule(data=st.data())
    def end_step(self, data):
        batch = self.step
        tokens = data.draw(st.lists(TOKENS, min_size=len(batch), max_size=len(batch)))
        before = {s.request_id: len(s.tokens) for s in batch}
        releases, pauses = set(self.deferred_releases), set(self.deferred_pauses)
        end = self.sched.end_step(batch, tokens)
        event(f"decode: step of {'some' if batch else 'no'} requests, {'some' if end.finished else 'none'} "
              f"finished, {'some' if releases else 'none'} released and {'some' if pauses else 'none'} paused "
              f"during it")
        self.step, self.step_also = None, set()
        self.deferred_releases, self.deferred_pauses = set(), set()
        assert [s.request_id for s in end.delivered] == [s.request_id for s in batch if s.request_id not in releases]
        for seq, token in zip(batch, tokens, strict=True):
            assert len(seq.tokens) == before[seq.request_id] + 1 and seq.tokens[-1] == token, \
                "every request of the step gets its token"
            self.note_ended(seq)
        for seq in end.finished:
            assert seq.request_id not in releases and seq.state is SeqState.FINISHED
            assert seq.finish in (Finish.STOP, Finish.LENGTH)
        for seq in batch:
            if seq.request_id in releases:
                assert seq.state is SeqState.FINISHED and seq.request_id not in self.sched.seqs
        assert set(end.paused) == pauses
        for rid, paused in end.paused.items():
            if paused is not None:
                assert paused.state is SeqState.PAUSED and self.sched.seqs[rid] is paused
            else:
                seq = self.sched.seqs.get(rid)
                assert seq is None or seq.state not in (SeqState.READY, SeqState.RUNNING)
        assert not self.sched.settling

    @precondition(lambda self: self.step is not None)
    @rule()
    def abandon_step(self):
        """The step failed: the engine fails its requests (release), then settles."""
        batch, also = self.step, self.step_also
        self.sched.abandon_step()
        event("decode: step abandoned")
        self.step, self.step_also = None, set()
        for rid in [*(s.request_id for s in batch), *sorted(also)]:
            seq = self.sched.seqs.get(rid)
            assert self.sched.release(rid) is True, "after abandon_step nothing is in flight"
            self.note_ended(seq)
        paused = self.sched.settle()
        assert set(paused) == self.deferred_pauses
        self.deferred_releases, self.deferred_pauses = set(), set()
        assert not self.sched.settling

    # -- endings and migration
    @rule(data=st.data())
    def release(self, data):
        rid = self.pick(data)
        seq = self.sched.seqs.get(rid)
        if self.in_step(rid):
            used = self.pool.num_used
            assert self.sched.release(rid) is False
            assert self.pool.num_used == used, "a request in the step keeps its blocks until it ends"
            self.deferred_releases.add(rid)
            assert self.sched.settling
        else:
            assert self.sched.release(rid) is True
            assert rid not in self.sched.seqs
            if seq is not None:
                assert (seq.state, seq.finish, seq.block_table) == (SeqState.FINISHED, Finish.ABORT, [])
                self.note_ended(seq)

    @rule(data=st.data())
    def abort(self, data):
        rid = self.pick(data)
        if self.in_step(rid):
            return  # the engine never aborts during the step (release defers)
        seq = self.sched.seqs.get(rid)
        assert self.sched.abort(rid) is seq
        assert rid not in self.sched.seqs
        self.note_ended(seq)

    @rule(data=st.data())
    def pause_or_defer(self, data):
        rid = self.pick(data)
        seq = self.sched.seqs.get(rid)
        if self.in_step(rid):
            assert self.sched.pause_or_defer(rid) == (False, None)
            self.deferred_pauses.add(rid)
            return
        decodable = seq is not None and seq.state in (SeqState.READY, SeqState.RUNNING)
        decided, paused = self.sched.pause_or_defer(rid)
        assert decided is True
        assert paused is (seq if decodable else None)
        if decodable:
            assert seq.state is SeqState.PAUSED

    @rule(data=st.data())
    def pause(self, data):
        rid = self.pick(data)
        if self.in_step(rid):
            return  # not for a request in the step (pause_or_defer is)
        seq = self.sched.seqs.get(rid)
        if seq is None:
            self.refused(lambda: self.sched.pause(rid), KeyError)
        elif seq.state not in (SeqState.READY, SeqState.RUNNING):
            self.refused(lambda: self.sched.pause(rid), ValueError, "only ready or running ones pause")
        else:
            assert self.sched.pause(rid) is seq and seq.state is SeqState.PAUSED

    @rule(data=st.data())
    def resume(self, data):
        rid = self.pick(data)
        seq = self.sched.seqs.get(rid)
        if seq is None:
            self.refused(lambda: self.sched.resume(rid), KeyError)
        elif seq.state is not SeqState.PAUSED:
            self.refused(lambda: self.sched.resume(rid), ValueError, "not paused")
        else:
            assert self.sched.resume(rid) is seq and seq.state is SeqState.READY
            assert list(self.sched._ready)[-1] == rid

    # -- invariants
    @invariant()
    def blocks_agree(self):
        check_pool(self.pool)
        tables = [b for seq in self.sched.seqs.values() for b in seq.block_table]
        assert len(tables) == len(set(tables)), "two requests share a block"
        assert set(tables) == pool_state(self.pool)[1], "the pool and the block tables disagree (a leak)"
        for seq in self.sched.seqs.values():
            assert len(seq.block_table) == self.pool.blocks_for(kv_tokens_for(seq.prompt_len, seq.params.max_tokens))

    @invariant()
    def states_agree(self):
        s = self.sched
        assert all(s.seqs[rid].state is SeqState.READY for rid in s._ready)
        assert all(s.seqs[rid].state is SeqState.RUNNING for rid in s._running)
        assert len(s._running) <= s.max_batch_size
        for rid, seq in s.seqs.items():
            assert seq.request_id == rid and seq.finish is None
            assert seq.state is not SeqState.FINISHED
            assert (seq.state is SeqState.READY) == (rid in s._ready)
            assert (seq.state is SeqState.RUNNING) == (rid in s._running)
            if seq.state is SeqState.WAITING_KV:
                assert seq.tokens == []
            else:
                assert 1 <= len(seq.tokens) < seq.params.max_tokens
        assert s.num_running == len(s._running) and s.num_waiting == len(s.seqs) - len(s._running)
        assert s.has_work() == bool(s._running or s._ready)
        if self.step is None:
            assert not s._in_step and not s.settling

    @invariant()
    def ended_are_final(self):
        for seq in self.ended:
            assert seq.state is SeqState.FINISHED and seq.block_table == [] and seq.finish is not None
            assert self.sched.seqs.get(seq.request_id) is not seq
            if seq.finish is Finish.STOP:
                assert seq.tokens[-1] in seq.params.stop_token_ids
            elif seq.finish is Finish.LENGTH:
                assert len(seq.tokens) == seq.params.max_tokens

    def teardown(self):
        if self.step is not None:
            self.sched.end_step(self.step, [7] * len(self.step))
        for rid in list(self.sched.seqs):
            assert self.sched.release(rid) is True
        assert self.sched.settle() == {}
        assert self.sched.seqs == {} and not self.sched.has_work()
        assert self.sched.num_running == 0 and self.sched.num_waiting == 0
        assert self.pool.num_used == 0 and self.pool.num_free == self.pool.num_blocks, "leak: blocks not freed"
        check_pool(self.pool)


TestDecodeSchedulerMachine = DecodeSchedulerMachine.TestCase
TestDecodeSchedulerMachine.settings = MACHINE_SETTINGS


# -- PrefillScheduler ------------------------------------------------------------------------------

@dataclass  # equal by value on purpose: the scheduler must go by identity
class Job:
    name: int


def op_lists(add: st.SearchStrategy, *others: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(st.one_of(add, *others), max_size=60)


@GIVEN_SETTINGS
@given(budget=st.integers(1, 64),
       ops=op_lists(st.tuples(st.just("add"), st.integers(0, 9), st.integers(1, 100)),
                    st.tuples(st.just("remove"), st.integers(0, 30)),
                    st.tuples(st.just("schedule"))))
def test_prefill_scheduler_batches_fifo_under_the_budget(budget, ops):
    sched: PrefillScheduler[Job] = PrefillScheduler(budget)
    model: deque[tuple[Job, int]] = deque()  # what should be waiting, in order
    added: list[Job] = []
    scheduled: list[Job] = []
    removed: list[Job] = []
    for op in ops:
        if op[0] == "add":
            job = Job(op[1])  # names repeat: equal jobs are still distinct requests
            sched.add(job, op[2])
            model.append((job, op[2]))
            added.append(job)
        elif op[0] == "remove":
            if not added:
                continue
            job = added[op[1] % len(added)]
            queued = any(j is job for j, _ in model)
            assert sched.remove(job) is queued
            if queued:
                model = deque((j, n) for j, n in model if j is not job)
                removed.append(job)
        else:
            batch = sched.schedule()
            assert bool(batch) == bool(model), "a batch whenever something waits"
            assert all(b is j for b, (j, _) in zip(batch, model, strict=False)), "FIFO: the batch is the queue's head"
            sizes = [n for _, n in list(model)[:len(batch)]]
            if len(batch) > 1:
                assert sum(sizes) <= budget, "a batch of several fits the budget"
            if len(model) > len(batch):
                assert sum(sizes) + model[len(batch)][1] > budget, "the batch takes every head prompt that fits"
            for _ in batch:
                model.popleft()
            scheduled += batch
        assert sched.num_waiting == len(model)
        assert sched.tokens_waiting == sum(n for _, n in model)
    while model:  # drain: nothing is lost
        batch = sched.schedule()
        assert batch and all(b is j for b, (j, _) in zip(batch, model, strict=False))
        for _ in batch:
            model.popleft()
        scheduled += batch
    assert sched.schedule() == [] and sched.num_waiting == 0 and sched.tokens_waiting == 0
    ids = [id(j) for j in scheduled + removed]
    assert len(ids) == len(set(ids)) == len(added), "every job scheduled or removed exactly once"


def test_prefill_scheduler_refuses_a_non_positive_budget():
    for budget in (0, -1):
        with pytest.raises(ValueError, match="token_budget must be positive"):
            PrefillScheduler(budget)


# -- LocalPrefill ----------------------------------------------------------------------------------

@GIVEN_SETTINGS
@given(budget=st.integers(1, 40),
       ops=op_lists(st.tuples(st.just("add"), st.integers(-2, 90)),
                    st.tuples(st.just("remove"), st.integers(0, 30)),
                    st.tuples(st.just("take"), st.integers(0, 50))))
def test_local_prefill_chunks_cover_each_prompt_once_in_order(budget, ops):
    local: LocalPrefill[Job] = LocalPrefill(budget)
    model: deque[list] = deque()  # [job, tokens, done]
    added: list[tuple[Job, int]] = []
    covered: dict[int, int] = {}  # id(job) -> tokens chunked so far
    completed: list[Job] = []
    removed: list[Job] = []
    for i, op in enumerate(ops):
        if op[0] == "add":
            job = Job(i)
            if op[1] < 1:
                with pytest.raises(ValueError, match="at least one token"):
                    local.add(job, op[1])
                continue
            local.add(job, op[1])
            model.append([job, op[1], 0])
            added.append((job, op[1]))
            covered[id(job)] = 0
        elif op[0] == "remove":
            if not added:
                continue
            job = added[op[1] % len(added)][0]
            queued = any(p[0] is job for p in model)
            assert local.remove(job) is queued
            if queued:
                model = deque(p for p in model if p[0] is not job)
                removed.append(job)
        else:
            decoding = op[1]
            step_budget = max(1, budget - decoding)
            chunks = local.take(decoding)
            taken = sum(c.end - c.start for c in chunks)
            assert taken <= step_budget
            assert bool(chunks) == bool(model), "a waiting prompt always gets at least one token"
            if model and taken < step_budget:
                assert len(chunks) == len(model), "the step's budget is left over only when every prompt is taken"
            for c, p in zip(chunks, list(model), strict=False):
                job, tokens, done = p
                assert c.job is job, "FIFO"
                assert c.start == done == covered[id(job)] < c.end <= tokens, "a chunk continues where the last ended"
                assert c.last == (c.end == tokens)
                covered[id(job)] = p[2] = c.end
            assert all(c.last for c in chunks[:-1]), "only the last chunk of a step may leave its prompt unfinished"
            for c in chunks:
                if c.last:
                    assert model.popleft()[0] is c.job
                    completed.append(c.job)
        assert bool(local) == bool(model) and local.num_waiting == len(model)
        assert local.tokens_waiting == sum(tokens - done for _, tokens, done in model)
    ids = [id(j) for j in completed + removed] + [id(p[0]) for p in model]
    assert sorted(ids) == sorted(id(j) for j, _ in added), "each prompt completed, removed or waiting, once"
    for job, tokens in added:
        if any(job is c for c in completed):
            assert covered[id(job)] == tokens


def test_local_prefill_refuses_a_non_positive_budget():
    with pytest.raises(ValueError, match="step_token_budget must be positive"):
        LocalPrefill(0)


# -- ShortBatcher ----------------------------------------------------------------------------------

@GIVEN_SETTINGS
@given(cap=st.integers(1, 50), wait=st.floats(0.0, 2.0),
       ops=op_lists(st.tuples(st.just("add"), st.integers(1, 80), st.floats(0.0, 1.0)),
                    st.tuples(st.just("poll"), st.floats(0.0, 1.0)),
                    st.tuples(st.just("remove"), st.integers(0, 30)),
                    st.tuples(st.just("flush"))))
def test_short_batcher_releases_every_prompt_once_fifo_under_the_cap(cap, wait, ops):
    batcher = ShortBatcher(token_cap=cap, wait_cap_s=wait)
    now = 0.0
    held: list[tuple[object, int, float]] = []  # the model: key, tokens, since
    keys: list[object] = []
    tokens_of: dict[int, int] = {}
    released: list[object] = []
    removed: list[object] = []

    def batch_out(batch, expected):
        assert [id(k) for k in batch] == [id(k) for k, _, _ in expected], "a batch is what was held, FIFO"
        if len(batch) > 1:
            assert sum(tokens_of[id(k)] for k in batch) <= cap, "a batch of several stays under the cap"
        released.extend(batch)

    for op in ops:
        if op[0] == "add":
            now += op[2]
            key = object()
            keys.append(key)
            tokens_of[id(key)] = op[1]
            out = batcher.add(key, op[1], now)
            if held and sum(t for _, t, _ in held) + op[1] > cap:
                assert out is not None
                batch_out(out, held)
                held = [(key, op[1], now)]
            else:
                held.append((key, op[1], now))
                if sum(t for _, t, _ in held) == cap:
                    assert out is not None
                    batch_out(out, held)
                    held = []
                else:
                    assert out is None
        elif op[0] == "poll":
            now += op[1]
            out = batcher.poll(now)
            if held and now >= held[0][2] + wait:
                assert out is not None
                batch_out(out, held)
                held = []
            else:
                assert out is None
        elif op[0] == "remove":
            if not keys:
                continue
            key = keys[op[1] % len(keys)]
            there = any(k is key for k, _, _ in held)
            assert batcher.remove(key) is there
            if there:
                held = [h for h in held if h[0] is not key]
                removed.append(key)
        else:
            out = batcher.flush()
            batch_out(out, held)
            held = []
        assert len(batcher) == len(held)
        assert batcher.due() == (held[0][2] + wait if held else None)
        total = sum(t for _, t, _ in held)
        assert total < cap or len(held) <= 1, "what is held stays under the cap (or is one prompt over it)"
    batch_out(batcher.flush(), held)
    assert len(batcher) == 0 and batcher.due() is None and batcher.flush() == []
    ids = [id(k) for k in released + removed]
    assert sorted(ids) == sorted(id(k) for k in keys), "every prompt released or removed exactly once"


# -- PrefillLedger ---------------------------------------------------------------------------------

WORKERS = st.sampled_from(["p0", "p1", "p2"])


@GIVEN_SETTINGS
@given(ops=op_lists(st.tuples(st.just("sent"), WORKERS, st.integers(0, 500), st.floats(0.0, 1.0)),
                    st.tuples(st.just("done"), st.integers(0, 40), st.booleans()),
                    st.tuples(st.just("unknown_done"), WORKERS)))
def test_prefill_ledger_counts_what_is_outstanding(ops):
    ledger = PrefillLedger()
    now = 0.0
    outstanding: list[tuple[str, object, int, float]] = []
    last_finished: dict[str, float] = {}
    for op in ops:
        if op[0] == "sent":
            now += op[3]
            key = object()
            ledger.sent(op[1], key, op[2], now)
            outstanding.append((op[1], key, op[2], now))
        elif op[0] == "done":
            if not outstanding:
                continue
            worker, key, _, _ = outstanding.pop(op[1] % len(outstanding))
            ledger.done(worker, key, now if op[2] else None)  # finished there, or withdrawn
            if op[2]:
                last_finished[worker] = now
        else:
            before = (dict(ledger.tokens), ledger.empty())
            with pytest.raises(KeyError):
                ledger.done(op[1], object())  # a prompt it was never told about
            assert (dict(ledger.tokens), ledger.empty()) == before
        for worker in ("p0", "p1", "p2"):
            mine = [o for o in outstanding if o[0] == worker]
            assert ledger.tokens[worker] == sum(o[2] for o in mine)
            since = max([min(o[3] for o in mine)] + [last_finished.get(worker, 0.0)]) if mine else now
            assert ledger.busy_s(worker, now) == now - since
        assert ledger.empty() == (not outstanding)
        workers = ["p0", "p1", "p2"]
        best = min(workers, key=lambda w: (ledger.tokens[w], w))
        assert ledger.least_loaded(workers, now) == (ledger.tokens[best], ledger.busy_s(best, now))
        assert ledger.least_loaded([], now) == (0, 0.0)
    for worker, key, _, _ in outstanding:
        ledger.done(worker, key)
    assert ledger.empty()


def test_prefill_ledger_sent_twice_with_one_key_is_refused_or_counted_once():
    ledger = PrefillLedger()
    key = object()
    ledger.sent("p0", key, 10, 0.0)
    try:
        ledger.sent("p0", key, 10, 1.0)
    except (KeyError, ValueError):
        return  # refusing a duplicate is fine too
    ledger.done("p0", key)
    assert ledger.empty() and ledger.tokens["p0"] == 0
