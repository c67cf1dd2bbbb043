"""The real default model end to end: SmolLM2-135M through gateway -> prefill -> KV stream ->
decode, greedy output identical to transformers' generate() for 16 concurrent requests."""

from __future__ import annotations

import asyncio
import random

import pytest

from common.modeling.loader import load_model, load_tokenizer
from services.client import generate
from tests.helpers import assert_no_leaks, check_greedy_identity, start_cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_cluster(redis_url, redis_prefix, tmp_path_factory):
    handle = start_cluster("smollm2", tmp_path_factory.mktemp("smollm2-cluster"), redis_url, redis_prefix + "smollm2:",
                           kv_blocks=1600)
    yield handle
    codes = handle.cluster.stop()
    assert all(code == 0 for code in codes.values()), codes


def natural_prompts(tokenizer, n: int, seed: int) -> list[list[int]]:
    """Real text (so the model is in its normal regime), cut to lengths from 8 to 1,000 tokens."""
    words = ("the history of science shows that careful measurement and simple models often explain "
             "more than grand theories ; in the city , people walked to the market , bought bread , "
             "and talked about the weather , the harvest and the news from the capital .").split()
    rng = random.Random(seed)
    text = " ".join(rng.choice(words) for _ in range(1500))
    ids = tokenizer(text).input_ids
    lengths = [8, 1000] + [rng.randint(8, 1000) for _ in range(n - 2)]
    return [ids[(start := rng.randrange(0, len(ids) - L)):start + L] for L in lengths]


async def test_smollm2_greedy_identity_16_concurrent(smollm2_cluster):
    tokenizer = load_tokenizer("smollm2")
    prompts = natural_prompts(tokenizer, 16, seed=1)
    max_tokens = [random.Random(2 + i).randint(4, 24) for i in range(16)]
    async with smollm2_cluster.channel() as ch:
        outs = await asyncio.gather(*(generate(ch, p, max_tokens=n, temperature=0.0, timeout=600)
                                      for p, n in zip(prompts, max_tokens, strict=True)))
    await assert_no_leaks(smollm2_cluster)
    loaded = load_model("smollm2")
    report = check_greedy_identity(loaded.model, prompts, [o.token_ids for o in outs], max_tokens,
                                   set(loaded.eos_token_ids))
    print(f"smollm2: {report.exact}/{report.requests} requests identical, {report.tokens_compared} tokens "
          f"compared, near-tie divergences (request, step, logit gap): {report.near_ties}")
    assert report.exact + len(report.near_ties) == 16


async def test_smollm2_capital_of_france(smollm2_cluster):
    async with smollm2_cluster.channel() as ch:
        out = await generate(ch, "The capital of France is", max_tokens=8, temperature=0.0)
    assert "Paris" in out.text
    await assert_no_leaks(smollm2_cluster)
