"""DecodeEngine with the fake runner, in one process: streams, batching, admission errors, KV
timeouts, release mid-step, pause/resume, and live migration between two engines.

The fake runner's tokens depend on the KV bytes in each request's own blocks, so "same tokens as
an undisturbed run" checks that the KV was where it should be, not only the bookkeeping.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from common.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from common.kv.block_pool import kv_tokens_for
from common.types import SamplingParams
from services.decode.engine import DecodeEngine, ErrorEvent, FinishedEvent, MovedEvent, TokensEvent
from services.decode.scheduler import Finish, SeqState
from services.kvtransfer.reader import chunk_ranges, read_messages
from tests.unit.inproc_kv import assert_decode_empty, push_prompt, running_decode, write_messages

PROMPT = [1000 + 37 * i for i in range(11)]


async def next_event(queue: asyncio.Queue, timeout: float = 5.0):
    return await asyncio.wait_for(queue.get(), timeout)


async def read_tokens(queue: asyncio.Queue, start_index: int, stop_at: int | None = None):
    """Tokens of a stream from `start_index` on, checking that indices are consecutive, up to the
    event that ends it (returned) or, with `stop_at`, until that index has arrived (None)."""
    tokens: list[int] = []
    while True:
        event = await next_event(queue)
        if not isinstance(event, TokensEvent):
            return tokens, event
        assert event.start_index == start_index + len(tokens), "token indices must be consecutive"
        tokens += event.token_ids
        if stop_at is not None and start_index + len(tokens) > stop_at:
            return tokens, None


async def run_request(engine: DecodeEngine, request_id: str, prompt: list[int], params: SamplingParams) -> list[int]:
    """Reserve, push the prompt's KV, read the stream to its end, release: the whole completion."""
    queue = engine.reserve(request_id, len(prompt), params)
    first = await push_prompt(engine, request_id, prompt, params)
    tokens, end = await read_tokens(queue, 1)
    engine.release(request_id)
    assert isinstance(end, FinishedEvent), end
    assert end.completion_tokens == 1 + len(tokens)
    return [first, *tokens]


async def test_stream_yields_consecutive_tokens_then_length_and_is_deterministic():
    """Tokens arrive with start_index 1, 2, ... and the stream ends with LENGTH after max_tokens;
    the same request twice gives the same completion."""
    params = SamplingParams(max_tokens=9)
    async with running_decode() as engine:
        queue = engine.reserve("r1", len(PROMPT), params)
        assert engine.scheduler.seqs["r1"].state is SeqState.WAITING_KV
        first = await push_prompt(engine, "r1", PROMPT, params)
        tokens, end = await read_tokens(queue, 1)
        assert len(tokens) == params.max_tokens - 1
        assert end == FinishedEvent(Finish.LENGTH, params.max_tokens)
        engine.release("r1")
        assert [first, *tokens] == await run_request(engine, "r2", PROMPT, params)
        assert await run_request(engine, "r3", PROMPT[:-1], params) != [first, *tokens]
        assert_decode_empty(engine)


async def test_tokens_in_a_batch_equal_tokens_alone():
    """Each request reads only its own blocks: running three together (one batch) gives each the
    completion it gets alone."""
    requests = {"a": (PROMPT, 12), "b": ([7, 8, 9], 5), "c": (PROMPT[3:] * 2, 17)}
    async with running_decode() as engine:
        alone = {rid: await run_request(engine, rid, p, SamplingParams(max_tokens=n))
                 for rid, (p, n) in requests.items()}
        steps_alone = engine.runner.decode_steps
        together = await asyncio.gather(*(run_request(engine, rid + "2", p, SamplingParams(max_tokens=n))
                                          for rid, (p, n) in requests.items()))
        assert dict(zip(requests, together, strict=True)) == alone
        assert engine.runner.decode_steps - steps_alone < steps_alone, "the three did not share steps"
        assert_decode_empty(engine)


async def test_out_of_blocks_and_duplicate_id_are_refused():
    """A reservation that does not fit is ResourceExhausted; a second one under a live id is
    InvalidArgument; neither takes blocks or disturbs the first."""
    async with running_decode(kv_blocks=8, block_size=4) as engine:
        engine.reserve("a", 20, SamplingParams(max_tokens=8))  # 27 KV tokens: 7 of 8 blocks
        first = engine.scheduler.seqs["a"]
        with pytest.raises(ResourceExhausted):
            engine.reserve("b", 8, SamplingParams(max_tokens=4))  # 3 blocks
        with pytest.raises(InvalidArgument):
            engine.reserve("a", 1, SamplingParams(max_tokens=1))
        assert engine.scheduler.pool.num_used == 7 and engine.scheduler.seqs == {"a": first}
        engine.release("a")
        assert_decode_empty(engine)


async def test_past_the_waiting_limit_a_reservation_is_refused_and_running_ones_do_not_count():
    async with running_decode(kv_blocks=256, block_size=4, waiting_limit=2) as engine:
        long = SamplingParams(max_tokens=200)  # still running when it is released
        engine.reserve("a", len(PROMPT), long)
        engine.reserve("b", len(PROMPT), long)
        with pytest.raises(ResourceExhausted, match="2 requests already wait"):
            engine.reserve("c", len(PROMPT), long)
        assert set(engine.scheduler.seqs) == {"a", "b"}  # the refused one took nothing
        await push_prompt(engine, "a", PROMPT, long)  # "a" joins the batch
        while engine.scheduler.num_running == 0:
            await asyncio.sleep(0.001)
        engine.reserve("c", len(PROMPT), long)  # one waits now: room for one more
        for name in "abc":
            engine.release(name)
        for _ in range(1000):  # a release during a step lands when the step ends
            if not engine.scheduler.seqs:
                break
            await asyncio.sleep(0.001)
        assert_decode_empty(engine)


async def test_kv_that_never_arrives_fails_the_stream_and_frees_the_blocks():
    """No KV push within kv_timeout_s: the stream gets DeadlineExceeded, the blocks go back."""
    async with running_decode(kv_timeout_s=0.2) as engine:
        started = time.monotonic()
        queue = engine.reserve("r", len(PROMPT), SamplingParams(max_tokens=4))
        assert engine.scheduler.pool.num_used > 0
        event = await next_event(queue)
        assert time.monotonic() - started >= 0.19
        assert isinstance(event, ErrorEvent) and isinstance(event.error, DeadlineExceeded)
        assert_decode_empty(engine)
        engine.release("r")  # what the stream's handler does next: harmless
        assert_decode_empty(engine)


async def test_release_during_a_step_frees_the_blocks_after_it():
    """release() of a request inside the running step waits for the step (its forward writes into
    those blocks), then frees them; the released stream gets nothing more."""
    async with running_decode(gated=True) as engine:
        runner = engine.runner
        queue = engine.reserve("r", len(PROMPT), SamplingParams(max_tokens=50))
        runner.close()
        await push_prompt(engine, "r", PROMPT, SamplingParams(max_tokens=50))
        await runner.wait_entered()  # a step with "r" is in flight
        engine.release("r")
        assert engine.scheduler.pool.num_used > 0, "blocks freed under a running forward"
        runner.open()
        for _ in range(500):
            if engine.scheduler.pool.num_used == 0:
                break
            await asyncio.sleep(0.001)
        assert queue.empty()
        assert_decode_empty(engine)


async def test_pause_stops_the_stream_and_resume_gives_the_undisturbed_tokens():
    """A paused request leaves the batch with its KV kept: no tokens while paused; after resume
    the completion is the one an undisturbed run gives."""
    params = SamplingParams(max_tokens=40)
    async with running_decode() as engine:
        reference = await run_request(engine, "ref", PROMPT, params)
        queue = engine.reserve("r", len(PROMPT), params)
        first = await push_prompt(engine, "r", PROMPT, params)
        before, _ = await read_tokens(queue, 1, stop_at=3)
        seq = await engine.pause("r")
        assert seq is not None and seq.state is SeqState.PAUSED and len(seq.tokens) < params.max_tokens
        while not queue.empty():  # tokens of steps that ended before the pause took effect
            event = queue.get_nowait()
            assert isinstance(event, TokensEvent) and event.start_index == 1 + len(before)
            before += event.token_ids
        assert [first, *before] == seq.tokens
        await asyncio.sleep(0.05)
        assert queue.empty() and len(seq.tokens) == 1 + len(before)
        engine.resume(seq)
        after, end = await read_tokens(queue, len(seq.tokens))
        assert isinstance(end, FinishedEvent) and end.finish is Finish.LENGTH
        assert [first, *before, *after] == reference
        engine.release("r")
        assert_decode_empty(engine)


async def test_migration_between_engines_continues_the_same_completion():
    """Live migration in one process: pause on A, copy KV [0, next_position) out of A's pool as
    wire messages into B's adopted reservation (other block size, other block ids), hand over.
    A's stream ends with Moved(next_index = tokens so far); A's tokens followed by B's equal an
    undisturbed run."""
    params = SamplingParams(max_tokens=30)
    async with running_decode(block_size=4) as a, running_decode(kv_blocks=40, block_size=8) as b:
        reference = await run_request(a, "ref", PROMPT, params)
        b.reserve("other", 5, SamplingParams(max_tokens=40))  # B's blocks for "r" are not A's ids
        queue_a = a.reserve("r", len(PROMPT), params)
        first = await push_prompt(a, "r", PROMPT, params)
        before, _ = await read_tokens(queue_a, 1, stop_at=4)
        seq = await a.pause("r")
        assert seq is not None and seq.state is SeqState.PAUSED

        ranges = chunk_ranges(a.runner.store.layout, 0, seq.next_position, max_bytes=128)
        messages = read_messages(a.runner.store, seq.block_table, ranges)
        seq_b = b.adopt("r", seq.prompt_len, seq.params)
        write_messages(b, seq_b, messages, kv_tokens_for(seq.prompt_len, seq.params.max_tokens))
        # The fake's tokens read only layer 0's K: compare every layer's K and V bytes as well.
        copied = read_messages(b.runner.store, seq_b.block_table, ranges)
        assert [m.chunk for m in copied] == [m.chunk for m in messages]
        b.kv_complete_migrated("r", seq.tokens)
        a.moved(seq, "B", "addr-b")
        assert_decode_empty(a)

        rest, moved = await read_tokens(queue_a, 1 + len(before))
        assert moved == MovedEvent("B", "addr-b", len(seq.tokens))
        assert [first, *before, *rest] == seq.tokens
        queue_b, _ = b.attach("r")
        tokens_b, end = await read_tokens(queue_b, len(seq.tokens))
        assert isinstance(end, FinishedEvent) and end.finish is Finish.LENGTH
        assert [*seq.tokens, *tokens_b] == reference
        for engine, rid in ((a, "r"), (b, "r"), (b, "other")):
            engine.release(rid)
        assert_decode_empty(a)
        assert_decode_empty(b)


async def test_attach_unknown_is_unavailable_and_an_unattached_adoption_is_dropped():
    """attach() of a request never migrated here is Unavailable; a migrated request nobody
    attaches to within kv_timeout_s of its arrival is dropped with its blocks (and can no longer
    be attached)."""
    async with running_decode(kv_timeout_s=0.2) as engine:
        with pytest.raises(Unavailable):
            engine.attach("nobody")
        engine.adopt("m", len(PROMPT), SamplingParams(max_tokens=8))
        with pytest.raises(Unavailable):
            engine.attach("m")  # its KV has not arrived yet
        engine.kv_complete_migrated("m", [101, 102])
        assert engine.scheduler.pool.num_used > 0
        await asyncio.sleep(0.3)
        assert_decode_empty(engine)
        with pytest.raises(Unavailable):
            engine.attach("m")


async def test_a_request_that_moves_on_before_its_gateway_attached_keeps_its_stream_for_the_attach():
    """A worker that adopted a request and switches away before the gateway attached (it moves
    the request on at once): the attach still finds the stream, which ends with `moved`."""
    async with running_decode(kv_timeout_s=5.0) as engine:
        seq = engine.adopt("hop", len(PROMPT), SamplingParams(max_tokens=8))
        engine.kv_complete_migrated("hop", [101, 102])
        paused = await engine.pause("hop")
        assert paused is seq
        engine.moved(seq, "next", "next-address")
        assert engine.scheduler.pool.num_used == 0  # the blocks went back at once
        queue, current = engine.attach("hop")
        assert current is None
        events = []
        while not queue.empty():
            events.append(queue.get_nowait())
        assert isinstance(events[-1], MovedEvent) and events[-1].next_index == len(seq.tokens)
        engine.release("hop")
        assert_decode_empty(engine)


async def run_here(engine: DecodeEngine, request_id: str, prompt: list[int], params: SamplingParams) -> list[int]:
    """Reserve and prefill here (no KV pushed): the whole completion, from index 0."""
    queue = engine.reserve(request_id, len(prompt), params)
    engine.prefill_here(request_id, prompt)
    tokens, end = await read_tokens(queue, 0)
    engine.release(request_id)
    assert isinstance(end, FinishedEvent), end
    return tokens


async def test_a_prompt_prefilled_here_in_chunks_decodes_as_one_whose_kv_was_pushed():
    """Chunks of 4 tokens (the step budget, less the decodes sharing the step): the fake runner's
    tokens read every position's KV back, so equal completions mean the chunks landed in place."""
    params = SamplingParams(max_tokens=7)
    async with running_decode(step_token_budget=4) as engine:
        pushed = await run_request(engine, "a", PROMPT, params)
        assert await run_here(engine, "b", PROMPT, params) == pushed
        # Two at once, one mid-decode while the other's chunks share its steps.
        both = await asyncio.gather(run_here(engine, "c", PROMPT, params), run_here(engine, "d", PROMPT[:5], params))
        assert both[0] == pushed and both[1] == await run_request(engine, "e", PROMPT[:5], params)
        assert_decode_empty(engine)


async def test_a_prompt_for_here_must_match_its_reservation_and_a_release_mid_chunk_waits_for_the_step():
    params = SamplingParams(max_tokens=4)
    async with running_decode(gated=True, step_token_budget=4) as engine:
        engine.reserve("r", len(PROMPT), params)
        with pytest.raises(InvalidArgument, match="reserved a 11-token prompt"):
            engine.prefill_here("r", PROMPT[:3])
        engine.runner.close()
        engine.prefill_here("r", PROMPT)
        await engine.runner.wait_entered()  # its first chunk is in the forward
        used = engine.scheduler.pool.num_used
        engine.release("r")
        assert engine.scheduler.pool.num_used == used  # the step still writes its blocks
        engine.runner.open()
        for _ in range(100):
            if engine.scheduler.pool.num_used == 0:
                break
            await asyncio.sleep(0.01)
        assert not engine.local and "r" not in engine.scheduler.seqs
        assert_decode_empty(engine)
