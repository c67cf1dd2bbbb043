"""Sliding windows and soft-capping in the paged paths, against transformers' own arithmetic:
the masks are its `sliding_window_overlay`, the soft-capped scores its Gemma2 eager attention, and
a windowed, soft-capped model (Gemma2 with an 8-token window) gives through each paged path (packed
prefill, decode batches read padded or ragged, chunks) the logits of its own forward."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.masking_utils import causal_mask_function, sliding_window_overlay
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

from common.kv.kv_store import PagedKVStore
from common.modeling.base import PromptChunk
from common.modeling.loader import LoadedModel
from common.modeling.paged_attention import (
    ChunkBatch,
    _softcapped_attention,
    context_view,
    ragged_decode,
    window_mask,
)
from common.modeling.runner import ModelRunner, kv_layout
from tests.model_coverage import ARCH_BY_NAME

BLOCK = 4
WINDOW = 8


@pytest.mark.parametrize("window", [None, 1, 5])
def test_window_mask_is_transformers_overlay(window):
    mask = window_mask(6, 5, 2, 9, window, "cpu")[0, 0]
    for i in range(5):
        for j in range(9):
            q, k = 6 + i, 2 + j
            want = causal_mask_function(0, 0, q, k) and (window is None or sliding_window_overlay(window)(0, 0, q, k))
            assert bool(mask[i, j]) == want, (q, k)


def test_context_view_reads_the_window_of_each_request():
    tables = torch.tensor([[3, 0, 7], [5, 1, 2]])  # 4-token blocks
    padded = context_view(tables, [11, 5], BLOCK, 99, 6, "cpu")  # 6 and 5 positions: padded
    assert padded.ragged_bounds is None
    # request 0 reads positions 5..10 (blocks 0 and 7), request 1 all of its 5 (blocks 5 and 1)
    assert padded.gather_slots.tolist() == [[1, 2, 3, 28, 29, 30], [20, 21, 22, 23, 4, 99]]
    assert padded.attn_mask[:, 0, 0].tolist() == [[True] * 6, [True] * 5 + [False]]
    whole = context_view(tables, [11, 1], BLOCK, 99, None, "cpu")
    assert ragged_decode([11, 1]) and whole.ragged_bounds == [0, 11, 12]
    assert whole.gather_slots.tolist() == [12, 13, 14, 15, 0, 1, 2, 3, 28, 29, 30, 20]


def test_chunk_reads_from_the_first_position_its_window_reaches():
    slots = torch.arange(10, 15)
    batch = ChunkBatch(None, 20, slots, torch.arange(25))
    first, mask = batch.keys(WINDOW)
    assert first == 20 - WINDOW + 1 and mask.shape == (1, 1, 5, 25 - first)
    assert batch.keys(None)[0] == 0
    assert ChunkBatch(None, 0, slots, slots).keys(WINDOW) == (0, None)  # 5 tokens: no window cuts in
    assert ChunkBatch(None, 0, slots, slots).keys(2)[1] is not None


def test_softcapped_scores_are_gemma2_eager():
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = 2, False
    q, k, v = torch.randn(2, 4, 5, 8) * 3, torch.randn(2, 2, 7, 8) * 3, torch.randn(2, 2, 7, 8)
    mask = window_mask(2, 5, 0, 7, 3, "cpu")
    float_mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    want, _ = eager_attention_forward(module, q, k, v, float_mask, scaling=0.3, softcap=5.0)
    torch.testing.assert_close(_softcapped_attention(q, k, v, mask, 0.3, 5.0), want)


@pytest.fixture(scope="module")
def gemma2():
    """Gemma2 (sliding and global layers, soft-capping) with an 8-token window, on 4-token blocks."""
    config = ARCH_BY_NAME["gemma2"].config()
    config.sliding_window = WINDOW
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
    loaded = LoadedModel("gemma2", model, config, torch.device("cpu"), torch.float32, "eager")
    runner = ModelRunner(loaded, PagedKVStore(kv_layout(loaded), 64, BLOCK, loaded.device))
    return model, runner


def own_logits(model, prompt: list[int]) -> torch.Tensor:
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            return model(torch.tensor([prompt])).logits[0].float()
    finally:
        model.set_attn_implementation("dopd_paged")


@pytest.mark.parametrize("lengths", [(30, 29, 28), (30, 3, 12)], ids=["padded", "ragged"])
def test_windowed_softcapped_model_through_every_path(gemma2, lengths):
    model, runner = gemma2
    rng = random.Random(len(lengths) + sum(lengths))
    prompts = [[rng.randrange(3, 1000) for _ in range(n)] for n in lengths]
    tables = [list(range(i * 12, i * 12 + 12))[::-1] for i in range(len(prompts))]  # scattered, backwards
    bounds = [0]
    for p in prompts:
        bounds.append(bounds[-1] + len(p))

    def keep(layer, k, v):
        for table, a, b in zip(tables, bounds[:-1], bounds[1:], strict=True):
            runner.store.write_tokens(layer, runner.store.slots(table, 0, b - a), k[:, a:b].transpose(0, 1),
                                      v[:, a:b].transpose(0, 1))

    with torch.inference_mode():
        firsts = runner.prefill(prompts, keep)
        nexts = [int(f.argmax()) for f in firsts]
        decoded = runner.decode(nexts, [len(p) for p in prompts], tables)
    for i, prompt in enumerate(prompts):
        own = own_logits(model, prompt + [nexts[i]])
        torch.testing.assert_close(firsts[i], own[-2], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(decoded[i], own[-1], atol=1e-4, rtol=1e-4)
    long = prompts[0]
    chunk_table = list(range(40, 48))
    with torch.inference_mode():
        for start in range(0, len(long), 7):  # chunks of 7 against an 8-token window
            logits = runner.prefill_chunk(PromptChunk(long[start:start + 7], start, chunk_table, None))
    torch.testing.assert_close(logits, own_logits(model, long)[-1], atol=1e-4, rtol=1e-4)
