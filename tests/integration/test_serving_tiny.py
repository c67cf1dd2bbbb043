"""The whole request path on real processes (tiny-random): gateway -> prefill -> KV stream ->
decode -> tokens back, greedy output identical to transformers' generate()."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from common.modeling.loader import load_model
from services.client import generate
from tests.helpers import assert_no_leaks, check_greedy_identity


def mixed_requests(seed: int, n: int, vocab: int, max_prompt: int = 1000):
    rng = random.Random(seed)
    lengths = [8, max_prompt] + [rng.randint(8, max_prompt) for _ in range(n - 2)]
    prompts = [[rng.randrange(3, vocab) for _ in range(length)] for length in lengths]
    max_tokens = [rng.randint(4, 40) for _ in range(n)]
    return prompts, max_tokens


async def test_greedy_identity_16_concurrent(tiny_cluster):
    model = load_model("tiny-random").model
    prompts, max_tokens = mixed_requests(0, 16, model.config.vocab_size)
    async with tiny_cluster.channel() as ch:
        outs = await asyncio.gather(*(generate(ch, p, max_tokens=n, temperature=0.0)
                                      for p, n in zip(prompts, max_tokens, strict=True)))
    assert len({len(o.token_ids) for o in outs}) > 1, "output lengths should differ"
    for out, n in zip(outs, max_tokens, strict=True):
        assert out.completion_tokens == len(out.token_ids) <= n
        assert out.finish_reason in ("length", "stop")
    report = check_greedy_identity(model, prompts, [o.token_ids for o in outs], max_tokens, {2})
    print(f"tiny-random: {report.exact}/{report.requests} requests identical, {report.tokens_compared} tokens "
          f"compared, near-tie divergences: {report.near_ties}")
    await assert_no_leaks(tiny_cluster)


async def test_text_prompt_and_chat(tiny_cluster):
    async with tiny_cluster.channel() as ch:
        raw = await generate(ch, "The capital of France is", max_tokens=8, temperature=0.0)
        chat = await generate(ch, "The capital of France is", max_tokens=8, temperature=0.0, chat=True)
    assert raw.completion_tokens == 8 and raw.text
    assert chat.prompt_tokens > raw.prompt_tokens  # the template wraps the prompt
    await assert_no_leaks(tiny_cluster)


async def test_same_seed_same_output(tiny_cluster):
    async with tiny_cluster.channel() as ch:
        kw = {"max_tokens": 24, "temperature": 1.0, "top_p": 0.95, "top_k": 50, "ignore_eos": True}
        a, b, c = await asyncio.gather(generate(ch, "Once upon a time", seed=7, **kw),
                                       generate(ch, "Once upon a time", seed=7, **kw),
                                       generate(ch, "Once upon a time", seed=8, **kw))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    await assert_no_leaks(tiny_cluster)


async def test_stop_string_ends_text(tiny_cluster):
    async with tiny_cluster.channel() as ch:
        full = await generate(ch, "Hello there", max_tokens=30, temperature=0.0, ignore_eos=True)
        stop = full.text[len(full.text) // 2:][:4]
        assert stop.strip(), full.text
        cut = await generate(ch, "Hello there", max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(stop)]
    await assert_no_leaks(tiny_cluster)


async def test_max_tokens_one(tiny_cluster):
    async with tiny_cluster.channel() as ch:
        out = await generate(ch, [5, 6, 7], max_tokens=1, temperature=0.0)
    assert out.completion_tokens == 1 and out.finish_reason == "length"
    await assert_no_leaks(tiny_cluster)


@pytest.mark.parametrize("when", ["before_first_token", "mid_stream"])
async def test_cancel_frees_every_block(tiny_cluster, when):
    async with tiny_cluster.channel() as ch:
        from common.pb import gateway_pb2_grpc
        from services.client import generate_request

        call = gateway_pb2_grpc.GatewayStub(ch).Generate(
            generate_request(list(range(10, 1010)), max_tokens=1000, temperature=0.0, ignore_eos=True), timeout=60)
        if when == "mid_stream":
            for _ in range(5):
                await call.read()
        else:
            await asyncio.sleep(0.05)
        assert call.cancel()
        assert await call.code() == grpc.StatusCode.CANCELLED
    await assert_no_leaks(tiny_cluster)
    async with tiny_cluster.channel() as ch:  # and it keeps serving
        assert (await generate(ch, [1, 2, 3], max_tokens=3, temperature=0.0)).completion_tokens == 3


async def test_deadline_exceeded_frees_blocks(tiny_cluster):
    async with tiny_cluster.channel() as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(ch, list(range(10, 500)), max_tokens=1500, temperature=0.0, ignore_eos=True, timeout=1.0)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await assert_no_leaks(tiny_cluster)


async def test_clients_may_reuse_a_request_id(tiny_cluster):
    async with tiny_cluster.channel() as ch:
        a, b = await asyncio.gather(generate(ch, [5, 6, 7], max_tokens=6, request_id="same"),
                                    generate(ch, [8, 9, 10], max_tokens=6, request_id="same"))
    assert a.request_id == b.request_id == "same"
    assert a.completion_tokens == b.completion_tokens == 6
    await assert_no_leaks(tiny_cluster)
