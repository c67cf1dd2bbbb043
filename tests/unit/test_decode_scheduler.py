import random

import pytest

from common.kv.block_pool import BlockPool
from common.types import SamplingParams
from services.decode.scheduler import DecodeScheduler, DecodeSeq, Finish, OutOfBlocks, SeqState

EOS = 2


def make_seq(rid: str, prompt_len: int = 10, max_tokens: int = 8, stop=(EOS,)) -> DecodeSeq:
    return DecodeSeq(rid, prompt_len, SamplingParams(max_tokens=max_tokens, stop_token_ids=frozenset(stop)))


def assert_no_leak(sched: DecodeScheduler) -> None:
    assert sched.pool.num_used == 0
    assert sched.pool.num_free == sched.pool.num_blocks
    assert sched.seqs == {}
    assert not sched.has_work()
    assert sched.num_running == 0 and sched.num_waiting == 0


@pytest.mark.parametrize("prompt_len, max_tokens, blocks", [(10, 8, 5), (1, 1, 1), (4, 1, 1), (4, 2, 2), (5, 4, 2),
                                                            (16, 1, 4), (16, 2, 5)])
def test_reserve_takes_blocks_for_prompt_plus_max_tokens_minus_one(prompt_len, max_tokens, blocks):
    sched = DecodeScheduler(BlockPool(64, 4), max_batch_size=4)
    seq = make_seq("r", prompt_len, max_tokens)
    sched.reserve(seq)
    assert len(seq.block_table) == blocks == sched.pool.num_used
    assert seq.state is SeqState.WAITING_KV
    assert sched.num_waiting == 1 and not sched.has_work()
    sched.abort("r")
    assert_no_leak(sched)


def test_reserve_duplicate_id_raises_and_keeps_first():
    sched = DecodeScheduler(BlockPool(64, 4), 4)
    first = make_seq("r")
    sched.reserve(first)
    used = sched.pool.num_used
    with pytest.raises(ValueError, match="already"):
        sched.reserve(make_seq("r"))
    assert sched.pool.num_used == used and sched.seqs["r"] is first
    sched.abort("r")
    assert_no_leak(sched)


def test_reserve_out_of_blocks():
    sched = DecodeScheduler(BlockPool(4, 4), 4)
    sched.reserve(make_seq("a", prompt_len=8, max_tokens=1))  # 2 blocks
    with pytest.raises(OutOfBlocks):
        sched.reserve(make_seq("b", prompt_len=8, max_tokens=2))  # 3 blocks, 2 free
    assert "b" not in sched.seqs and sched.pool.num_used == 2
    sched.abort("a")
    assert_no_leak(sched)


def test_kv_complete_makes_ready_and_rejects_second_call():
    sched = DecodeScheduler(BlockPool(64, 4), 4)
    sched.reserve(make_seq("r"))
    seq = sched.kv_complete("r", 100)
    assert seq.state is SeqState.READY and seq.tokens == [100] and seq.next_position == 10
    assert sched.has_work()
    with pytest.raises(ValueError):
        sched.kv_complete("r", 101)
    sched.abort("r")
    assert_no_leak(sched)


@pytest.mark.parametrize("max_tokens, first", [(8, EOS), (1, 100)])
def test_kv_complete_finishes_at_once(max_tokens, first):
    sched = DecodeScheduler(BlockPool(64, 4), 4)
    sched.reserve(make_seq("r", max_tokens=max_tokens))
    seq = sched.kv_complete("r", first)
    assert seq.state is SeqState.FINISHED and seq.block_table == []
    assert seq.finish is (Finish.STOP if first == EOS else Finish.LENGTH)
    assert sched.schedule() == []
    assert_no_leak(sched)


def test_schedule_respects_batch_size_and_tops_up_fifo():
    sched = DecodeScheduler(BlockPool(256, 4), max_batch_size=2)
    for rid in "abcde":
        sched.reserve(make_seq(rid, max_tokens=4))
    for rid in "cabed":  # ready order c, a, b, e, d
        sched.kv_complete(rid, 100)
    batch = sched.schedule()
    assert [s.request_id for s in batch] == ["c", "a"]
    assert all(s.state is SeqState.RUNNING for s in batch)
    assert sched.num_running == 2 and sched.num_waiting == 3
    assert [s.request_id for s in sched.schedule()] == ["c", "a"]  # stable while nothing finishes
    sched.update(batch, [EOS, 7])  # c stops, a goes on
    assert [s.request_id for s in sched.schedule()] == ["a", "b"]
    sched.abort("a")
    assert [s.request_id for s in sched.schedule()] == ["b", "e"]
    for rid in "bed":
        sched.abort(rid)
    assert_no_leak(sched)


def test_update_appends_and_finishes_on_stop_and_length():
    sched = DecodeScheduler(BlockPool(64, 4), 4)
    sched.reserve(make_seq("stop", max_tokens=10))
    sched.reserve(make_seq("len", max_tokens=3))
    sched.kv_complete("stop", 100)
    sched.kv_complete("len", 200)
    batch = sched.schedule()
    assert sched.update(batch, [101, 201]) == []
    assert [s.tokens for s in batch] == [[100, 101], [200, 201]]
    assert batch[0].next_position == 11
    finished = sched.update(batch, [EOS, 202])
    assert [(s.request_id, s.finish) for s in finished] == [("stop", Finish.STOP), ("len", Finish.LENGTH)]
    assert batch[0].tokens == [100, 101, EOS] and batch[1].tokens == [200, 201, 202]
    assert_no_leak(sched)


def test_update_length_mismatch_raises():
    sched = DecodeScheduler(BlockPool(64, 4), 4)
    sched.reserve(make_seq("r"))
    sched.kv_complete("r", 100)
    with pytest.raises(ValueError):
        sched.update(sched.schedule(), [1, 2])
    sched.abort("r")
    assert_no_leak(sched)


@pytest.mark.parametrize("state", [SeqState.WAITING_KV, SeqState.READY, SeqState.RUNNING])
def test_abort_in_every_state(state):
    sched = DecodeScheduler(BlockPool(64, 4), 4)
    sched.reserve(make_seq("r"))
    if state is not SeqState.WAITING_KV:
        sched.kv_complete("r", 100)
    batch = sched.schedule() if state is SeqState.RUNNING else []
    assert sched.seqs["r"].state is state
    seq = sched.abort("r")
    assert seq.state is SeqState.FINISHED and seq.finish is Finish.ABORT
    assert sched.abort("r") is None
    assert sched.schedule() == []
    if batch:  # the step that included it finishes after the abort: the token is dropped
        assert sched.update(batch, [5]) == []
        assert seq.tokens == [100]
    assert_no_leak(sched)


def test_abort_finished_or_unknown_is_none():
    sched = DecodeScheduler(BlockPool(64, 4), 4)
    sched.reserve(make_seq("r", max_tokens=1))
    sched.kv_complete("r", 100)
    assert sched.abort("r") is None
    assert sched.abort("nope") is None
    assert_no_leak(sched)


def test_random_simulation_ends_without_leaks():
    rng = random.Random(7)
    pool = BlockPool(num_blocks=96, block_size=4)
    sched = DecodeScheduler(pool, max_batch_size=5)
    waiting_kv: list[str] = []
    expected_finish: dict[str, Finish] = {}
    seqs: dict[str, DecodeSeq] = {}
    next_id = 0
    for _ in range(3000):
        op = rng.random()
        if op < 0.3 and next_id < 400:
            seq = make_seq(f"r{next_id}", prompt_len=rng.randint(1, 30), max_tokens=rng.randint(1, 12))
            next_id += 1
            try:
                sched.reserve(seq)
            except OutOfBlocks:
                assert pool.blocks_for(seq.prompt_len + seq.params.max_tokens - 1) > pool.num_free
                continue
            seqs[seq.request_id] = seq
            waiting_kv.append(seq.request_id)
        elif op < 0.5 and waiting_kv:
            rid = waiting_kv.pop(rng.randrange(len(waiting_kv)))
            sched.kv_complete(rid, EOS if rng.random() < 0.1 else 100)
        elif op < 0.55 and sched.seqs:
            rid = rng.choice(sorted(sched.seqs))
            if rid in waiting_kv:
                waiting_kv.remove(rid)
            expected_finish[rid] = Finish.ABORT
            sched.abort(rid)
        else:
            batch = sched.schedule()
            assert len(batch) <= sched.max_batch_size
            assert len(batch) == min(sched.max_batch_size, len(batch) + sum(
                s.state is SeqState.READY for s in sched.seqs.values()))
            if batch and rng.random() < 0.1:  # an abort lands while the step runs
                victim = rng.choice(batch)
                expected_finish[victim.request_id] = Finish.ABORT
                sched.abort(victim.request_id)
            sched.update(batch, [EOS if rng.random() < 0.05 else 100 + i for i in range(len(batch))])
        used = sum(len(s.block_table) for s in sched.seqs.values())
        assert used == pool.num_used and pool.num_free + pool.num_used == pool.num_blocks
        for s in sched.seqs.values():
            assert s.state is not SeqState.FINISHED
            assert len(s.block_table) == pool.blocks_for(s.prompt_len + s.params.max_tokens - 1)
            assert len(s.tokens) < s.params.max_tokens
    # drain: finish the KV of the rest and step until nothing is left
    for rid in waiting_kv:
        sched.kv_complete(rid, 100)
    while sched.has_work():
        batch = sched.schedule()
        sched.update(batch, [100] * len(batch))
    assert_no_leak(sched)
    for rid, seq in seqs.items():
        assert seq.state is SeqState.FINISHED and seq.block_table == []
        if rid in expected_finish:
            assert seq.finish is expected_finish[rid]
        elif seq.finish is Finish.LENGTH:
            assert len(seq.tokens) == seq.params.max_tokens
        else:
            assert seq.finish is Finish.STOP and seq.tokens[-1] == EOS


def test_releases_and_pauses_during_a_step_wait_for_its_end():
    sched = DecodeScheduler(BlockPool(64, 4), max_batch_size=4)
    for rid in "abcd":
        sched.reserve(make_seq(rid))
        sched.kv_complete(rid, first_token=5)
    batch = sched.begin_step()
    assert [s.request_id for s in batch] == list("abcd")
    used = sched.pool.num_used
    assert sched.release("a") is False  # in the step: its blocks are being written
    assert sched.pause_or_defer("b") == (False, None)
    assert sched.pool.num_used == used and sched.settling
    end = sched.end_step(batch, [7, 7, EOS, 7])
    assert [s.request_id for s in end.delivered] == ["b", "c", "d"]  # a's token never goes out
    assert [s.request_id for s in end.finished] == ["c"]
    assert end.paused == {"b": sched.seqs["b"]} and sched.seqs["b"].state is SeqState.PAUSED
    assert sched.seqs["b"].tokens == [5, 7]  # paused after its step's token
    assert "a" not in sched.seqs and not sched.settling
    # Out of a step, both happen at once.
    assert sched.pause_or_defer("d") == (True, sched.seqs["d"])
    assert sched.pause_or_defer("a") == (True, None)  # ended: nothing to pause
    assert sched.release("b") is True and sched.release("d") is True
    assert_no_leak(sched)


def test_a_pause_asked_for_in_a_step_that_finishes_the_request_says_it_ended():
    sched = DecodeScheduler(BlockPool(64, 4), max_batch_size=4)
    sched.reserve(make_seq("r", max_tokens=2))
    sched.kv_complete("r", first_token=5)
    batch = sched.begin_step()
    sched.pause_or_defer("r")
    end = sched.end_step(batch, [9])
    assert end.finished == batch and end.paused == {"r": None}
    assert_no_leak(sched)


def test_an_abandoned_step_settles_after_its_requests_failed():
    sched = DecodeScheduler(BlockPool(64, 4), max_batch_size=4)
    sched.reserve(make_seq("r"))
    sched.kv_complete("r", first_token=5)
    sched.begin_step()
    sched.pause_or_defer("r")
    sched.abandon_step()
    assert sched.release("r") is True  # the engine fails the step's requests: freed at once
    assert sched.settle() == {"r": None}
    assert_no_leak(sched)


def test_a_release_waits_for_the_copies_into_the_blocks():
    """A KV transfer's thread may still write a reservation's blocks when its client goes away:
    the blocks are lent to no one until the last copy has ended."""
    sched = DecodeScheduler(BlockPool(8, 4), 4)
    seq = make_seq("r", prompt_len=10, max_tokens=3)
    sched.reserve(seq)
    blocks = list(seq.block_table)
    sched.begin_copy("r")
    sched.begin_copy("r")
    assert sched.release("r") is False and sched.release_pending("r") and sched.settling
    assert sched.pool.num_used == len(blocks)  # still held: the copies may write them
    with pytest.raises(ValueError):
        sched.begin_copy("r")  # no new copy into a released request
    with pytest.raises(OutOfBlocks):
        sched.reserve(make_seq("s", prompt_len=28, max_tokens=1))  # the blocks are not lent again
    assert sched.end_copy("r") is False  # one copy still runs
    assert sched.end_copy("r") is True  # the last: the release is applied now
    assert seq.state is SeqState.FINISHED and not sched.settling
    assert_no_leak(sched)
    # Without a release, copies change nothing.
    sched.reserve(make_seq("t"))
    sched.begin_copy("t")
    assert sched.end_copy("t") is False and "t" in sched.seqs
    sched.abort("t")
    assert_no_leak(sched)
    with pytest.raises(ValueError):
        sched.begin_copy("gone")
