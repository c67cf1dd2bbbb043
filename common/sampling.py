"""Sampling parameters and the sampler.

Randomness is derived from (seed, index of the token in the completion), not from a generator
that lives in one process: the prefill worker samples token 0 and the decode worker the rest,
and the same seed still gives the same output wherever each token is sampled.
"""

from __future__ import annotations

import torch

from common.types import GREEDY_EPSILON, SamplingParams

__all__ = ["GREEDY_EPSILON", "SamplingParams", "sample_batch", "sample_token"]

_SEED_STRIDE = 1_000_003


def sample_token(logits: torch.Tensor, params: SamplingParams, token_index: int) -> int:
    """Sample one token id from a [vocab] row of logits."""
    if params.greedy:
        return int(torch.argmax(logits))
    # On the CPU whatever the model's device: the (seed, index) stream is then the same everywhere.
    logits = logits.float().cpu() / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p; keep the first always.
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    index = params.index_offset + token_index  # in the whole completion, across replays
    generator = torch.Generator().manual_seed((params.seed * _SEED_STRIDE + index) % (2**63))
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], token_indices: list[int]) -> list[int]:
    """Sample one token per row of [batch, vocab] logits. Greedy rows share one argmax."""
    greedy = torch.argmax(logits, dim=-1).tolist()
    return [
        greedy[i] if p.greedy else sample_token(logits[i], p, token_indices[i])
        for i, p in enumerate(params)
    ]
