"""PrefillEngine with the fake runner, in one process: batching under the token budget, KV landing
in each prompt's decode reservation (through tests/unit/inproc_kv.py's in-process sender), the
first token, cancellation while queued, and a failed hand-off.

The decode engine here is only the KV target and is not started: its pool then holds exactly the
pushed KV, which the tests read back.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from common.errors import ResourceExhausted, Unavailable
from common.modeling.fake_runner import FakeRunner, kv_value
from common.types import SamplingParams
from services.decode.engine import DecodeEngine, ErrorEvent
from services.decode.scheduler import SeqState
from services.prefill.engine import PrefillEngine
from tests.unit.inproc_kv import (
    GatedRunner,
    InProcTransport,
    assert_decode_empty,
    fake_runner,
    running_decode,
)

DECODE = "decode-0:1"
PARAMS = SamplingParams(max_tokens=4)


@contextlib.asynccontextmanager
async def running_prefill(open_sender, token_budget: int = 16, gated: bool = False, queue_limit: int = 512):
    runner = fake_runner(kv_blocks=4, block_size=4)  # prefill keeps no KV; the pool is unused
    model = GatedRunner(runner) if gated else runner
    executor = ThreadPoolExecutor(max_workers=1)
    engine = PrefillEngine(model, executor, open_sender, token_budget, queue_limit)
    engine.start()
    try:
        yield engine
    finally:
        if gated:
            model.open()
        await engine.stop()
        executor.shutdown(wait=True)


def prompt(n: int, seed: int) -> list[int]:
    return [500 + (seed * 101 + 7 * i) % 3000 for i in range(n)]


def reference_first_token(p: list[int]) -> int:
    return FakeRunner(1, 1).prefill_sample([p], [PARAMS], None)[0]


def assert_prompt_kv(decode: DecodeEngine, request_id: str, p: list[int]) -> None:
    """The reservation's blocks hold the fake model's K and V of every (layer, position) of `p`."""
    store = decode.runner.store
    slots = store.slots(decode.scheduler.seqs[request_id].block_table, 0, len(p))
    for layer in range(store.layout.num_layers):
        expected = torch.tensor([kv_value(t, i, layer) for i, t in enumerate(p)]).view(-1, 1, 1)
        assert torch.equal(store.flat_k(layer)[slots], expected.expand_as(store.flat_k(layer)[slots]))
        assert torch.equal(store.flat_v(layer)[slots], expected.expand_as(store.flat_v(layer)[slots]))


async def assert_prefill_idle(engine: PrefillEngine) -> None:
    """Nothing queued, running or still handing off. A batch's completion leaves `busy` a loop
    tick after its last caller is answered (a done callback), hence the few yields."""
    for _ in range(10):
        if not engine.busy:
            break
        await asyncio.sleep(0)
    assert not engine.busy and engine.num_waiting == 0


async def test_prompts_are_batched_under_the_budget_and_their_kv_lands_in_each_reservation():
    """Five prompts submitted at once run as two packed forwards (budget 16: 3+5+6, then 10+4);
    each prompt's KV is in its own decode reservation, and its first token is the fake model's
    first token for that prompt alone."""
    prompts = {f"r{i}": prompt(n, i) for i, n in enumerate([3, 5, 6, 10, 4])}
    async with running_decode(start=False) as decode:
        transport = InProcTransport({DECODE: decode})
        async with running_prefill(transport.open_sender, token_budget=16) as engine:
            for rid, p in prompts.items():
                decode.reserve(rid, len(p), PARAMS)
            results = await asyncio.gather(*(engine.prefill(rid, p, PARAMS, DECODE, timeout=5)
                                             for rid, p in prompts.items()))
            assert engine.runner.prefills == 2
            layout = decode.runner.store.layout
            for (rid, p), result in zip(prompts.items(), results, strict=True):
                assert result.first_token_id == reference_first_token(p)
                assert result.kv_bytes == layout.bytes_for(len(p)) and transport.senders[rid].chunks > 1
                seq = decode.scheduler.seqs[rid]
                assert seq.state is SeqState.READY and seq.tokens == [result.first_token_id]
                assert_prompt_kv(decode, rid, p)
                decode.release(rid)
            await assert_prefill_idle(engine)
        assert_decode_empty(decode)


async def test_a_caller_cancelled_while_queued_never_runs_and_its_sender_is_cancelled():
    """While one forward is held in flight, a second prompt waits in the queue; its caller goes
    away: it is taken out of the queue (never prefilled) and its KV stream is cancelled (the
    decode reservation fails and frees its blocks)."""
    p_a, p_b = prompt(6, 1), prompt(5, 2)
    async with running_decode(start=False) as decode:
        transport = InProcTransport({DECODE: decode})
        async with running_prefill(transport.open_sender, gated=True) as engine:
            runner = engine.runner
            decode.reserve("a", len(p_a), PARAMS)
            queue_b = decode.reserve("b", len(p_b), PARAMS)
            runner.close()
            task_a = asyncio.create_task(engine.prefill("a", p_a, PARAMS, DECODE, timeout=5))
            await runner.wait_entered()
            task_b = asyncio.create_task(engine.prefill("b", p_b, PARAMS, DECODE, timeout=5))
            while engine.num_waiting == 0:
                await asyncio.sleep(0)
            task_b.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task_b
            assert transport.senders["b"].cancelled and engine.num_waiting == 0
            event = queue_b.get_nowait()
            assert isinstance(event, ErrorEvent) and isinstance(event.error, Unavailable)
            runner.open()
            result = await task_a
            assert result.first_token_id == reference_first_token(p_a)
            assert runner.inner.prefills == 1, "the cancelled prompt was prefilled"
            decode.release("a")
            decode.release("b")
            await assert_prefill_idle(engine)
        assert_decode_empty(decode)


async def test_past_its_queue_limit_a_prompt_is_refused_at_once_and_the_queued_ones_are_served():
    prompts = {name: prompt(6, i) for i, name in enumerate("abcd")}
    async with running_decode(start=False) as decode:
        transport = InProcTransport({DECODE: decode})
        # A budget of one prompt a batch: "a" runs (held in its forward), "b" and "c" fill the queue.
        async with running_prefill(transport.open_sender, token_budget=6, gated=True, queue_limit=2) as engine:
            runner = engine.runner
            for name, p in prompts.items():
                decode.reserve(name, len(p), PARAMS)
            runner.close()
            tasks = {"a": asyncio.create_task(engine.prefill("a", prompts["a"], PARAMS, DECODE, timeout=5))}
            await runner.wait_entered()
            for name in "bc":
                tasks[name] = asyncio.create_task(engine.prefill(name, prompts[name], PARAMS, DECODE, timeout=5))
            while engine.num_waiting < 2:
                await asyncio.sleep(0)
            with pytest.raises(ResourceExhausted, match="2 prompts already wait"):
                await engine.prefill("d", prompts["d"], PARAMS, DECODE, timeout=5)
            assert "d" not in transport.senders  # refused before any KV stream opened
            runner.open()
            for name, task in tasks.items():
                assert (await task).first_token_id == reference_first_token(prompts[name])
            for name in prompts:
                decode.release(name)
            await assert_prefill_idle(engine)
        assert_decode_empty(decode)


class BrokenSender:
    """A hand-off that fails: the decode worker went away."""

    done_at = None

    def __init__(self) -> None:
        self.cancelled = False

    def put_layer(self, layer, k, v) -> None:
        pass

    def finish(self, first_token_id: int) -> None:
        pass

    def cancel(self) -> None:
        self.cancelled = True

    async def wait(self) -> int:
        raise Unavailable("decode worker gone")


async def test_a_failed_hand_off_fails_its_caller_only_and_the_engine_serves_on():
    """A sender whose wait() raises Unavailable: that caller gets Unavailable; the prompt batched
    with it and a later one are served normally."""
    prompts = {"bad": prompt(4, 3), "good": prompt(7, 4), "later": prompt(9, 5)}
    async with running_decode(start=False) as decode:
        transport = InProcTransport({DECODE: decode})

        def open_sender(address, request_id, num_tokens, timeout):
            if request_id == "bad":
                return BrokenSender()
            return transport.open_sender(address, request_id, num_tokens, timeout)

        async with running_prefill(open_sender, token_budget=32) as engine:
            for rid in ("good", "later"):
                decode.reserve(rid, len(prompts[rid]), PARAMS)
            bad, good = await asyncio.gather(
                *(engine.prefill(rid, prompts[rid], PARAMS, DECODE, timeout=5) for rid in ("bad", "good")),
                return_exceptions=True)
            assert isinstance(bad, Unavailable)
            assert engine.runner.prefills == 1, "bad and good should share a forward"
            assert good.first_token_id == reference_first_token(prompts["good"])
            later = await engine.prefill("later", prompts["later"], PARAMS, DECODE, timeout=5)
            assert later.first_token_id == reference_first_token(prompts["later"])
            assert_prompt_kv(decode, "later", prompts["later"])
            decode.release("good")
            decode.release("later")
            await assert_prefill_idle(engine)
        assert_decode_empty(decode)
