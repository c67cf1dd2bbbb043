"""Chunked prefill on the paged pool with the real model code (tiny-random): a prompt prefilled in
chunks, each attending to the earlier ones read back from the request's blocks, gives the same
last-token logits as one whole prefill, and the same next decode step."""

from __future__ import annotations

import torch

from common.modeling.base import PromptChunk
from common.modeling.registry import RunnerSpec, build_runner
from common.types import SamplingParams


def test_chunks_over_the_pool_equal_one_whole_prefill():
    runner = build_runner(RunnerSpec("tiny-random", kv_blocks=64, block_size=16)).runner
    prompt = list(range(5, 50))  # 45 tokens: chunks of 20, 13 and 12, across block edges
    whole = runner.prefill([prompt], None)[0]
    scattered = [3, 7, 1]
    for start, end in ((0, 20), (20, 33), (33, 45)):
        logits = runner.prefill_chunk(PromptChunk(prompt[start:end], start, scattered, None))
    torch.testing.assert_close(logits, whole, atol=1e-4, rtol=1e-4)
    token = int(whole.argmax())
    after_chunks = runner.decode([token], [45], [scattered])[0]

    contiguous = [9, 10, 11]

    def keep(layer, k, v):  # the whole prefill's KV, written where a decode worker would
        runner.store.write_tokens(layer, runner.store.slots(contiguous, 0, 45), k.transpose(0, 1), v.transpose(0, 1))

    runner.prefill([prompt], keep)
    torch.testing.assert_close(after_chunks, runner.decode([token], [45], [contiguous])[0], atol=1e-4, rtol=1e-4)
    # Sampling happens on the last chunk only.
    assert runner.prefill_chunk_sample(PromptChunk(prompt[:20], 0, scattered, None)) is None
    firsts, tokens = runner.mixed_sample([PromptChunk(prompt, 0, scattered, SamplingParams(max_tokens=2))], None)
    assert firsts == [token] and tokens == []
