"""Decode attention on the SDPA path with the real model code (tiny-random): a batch of requests
at very different contexts gives each request the logits it gets alone, whether the step reads
the contexts ragged (one call per request) or padded (one masked call), and `ragged_decode`
picks ragged only where padding would waste reads."""

from __future__ import annotations

import pytest
import torch

from common.modeling import paged_attention
from common.modeling.paged_attention import ragged_decode
from common.modeling.registry import RunnerSpec, build_runner

BLOCK = 16


def test_ragged_only_where_padding_wastes_reads():
    assert not ragged_decode([512] * 16)  # alike: one padded call is cheaper
    assert not ragged_decode([500, 512, 480])
    assert ragged_decode([200] * 14 + [2000] * 2)
    assert ragged_decode([1, 100])
    assert not ragged_decode([7])


@pytest.fixture(scope="module")
def runner_with_contexts():
    """A runner whose pool holds three requests' prompts (KV from real prefills), at 5, 40 and
    150 tokens, in scattered blocks."""
    runner = build_runner(RunnerSpec("tiny-random", kv_blocks=64, block_size=BLOCK)).runner
    prompts = [list(range(3, 8)), list(range(10, 50)), [(7 * i) % 300 + 1 for i in range(150)]]
    tables = [[40], [5, 33, 2], [60, 1, 17, 22, 9, 50, 30, 12, 8, 41]]
    firsts = []
    for prompt, table in zip(prompts, tables, strict=True):
        slots = runner.store.slots(table, 0, len(prompt))

        def keep(layer, k, v, slots=slots):
            runner.store.write_tokens(layer, slots, k.transpose(0, 1), v.transpose(0, 1))

        firsts.append(int(runner.prefill([prompt], keep)[0].argmax()))
    return runner, firsts, [len(p) for p in prompts], tables


@pytest.mark.parametrize("factor", [1.25, float("inf")], ids=["ragged", "padded"])
def test_batch_equals_each_request_alone(runner_with_contexts, monkeypatch, factor):
    runner, firsts, positions, tables = runner_with_contexts
    alone = [runner.decode([t], [p], [tb])[0] for t, p, tb in zip(firsts, positions, tables, strict=True)]
    monkeypatch.setattr(paged_attention, "RAGGED_PADDING_FACTOR", factor)
    assert ragged_decode([p + 1 for p in positions]) == (factor != float("inf"))
    together = runner.decode(firsts, positions, tables)
    for i, logits in enumerate(alone):
        torch.testing.assert_close(together[i], logits, atol=1e-4, rtol=1e-4)
