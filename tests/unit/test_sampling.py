import pytest
import torch

from common.sampling import SamplingParams, sample_batch, sample_token

VOCAB = 500


def logits_row(seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype):
    for seed in range(10):
        row = logits_row(seed).to(dtype)
        assert SamplingParams().greedy
        assert sample_token(row, SamplingParams(), token_index=seed) == int(torch.argmax(row))


def test_same_seed_and_index_same_token():
    row = logits_row(0, scale=0.1)  # flat: many tokens are likely
    p = SamplingParams(temperature=1.0, seed=1234)
    for index in range(20):
        assert sample_token(row, p, index) == sample_token(row.clone(), p, index)
    # and across a different (but identical) params object, e.g. rebuilt on another worker
    assert sample_token(row, SamplingParams(temperature=1.0, seed=1234), 5) == sample_token(row, p, 5)


def test_different_seeds_give_different_tokens():
    row = torch.zeros(VOCAB)  # uniform
    draws = {seed: [sample_token(row, SamplingParams(temperature=1.0, seed=seed), i) for i in range(50)]
             for seed in (0, 1, 2, 3)}
    assert len({tuple(d) for d in draws.values()}) == 4
    for a in draws:
        for b in draws:
            if a < b:
                assert sum(x != y for x, y in zip(draws[a], draws[b], strict=True)) > 40
    assert len(set(draws[0])) > 40  # the token index varies the draw too
    assert all(0 <= t < VOCAB for d in draws.values() for t in d)


def test_top_k_one_is_greedy():
    for seed in range(20):
        row = logits_row(seed, scale=0.5)
        p = SamplingParams(temperature=2.0, top_k=1, seed=seed)
        assert sample_token(row, p, seed) == int(torch.argmax(row))


def test_top_k_restricts_to_k_best():
    row = logits_row(7, scale=0.1)
    best = set(torch.topk(row, 5).indices.tolist())
    p = SamplingParams(temperature=1.0, top_k=5, seed=3)
    assert {sample_token(row, p, i) for i in range(200)} <= best


@pytest.mark.parametrize("top_p", [1e-6, 1e-3])
def test_tiny_top_p_is_greedy(top_p):
    for seed in range(20):
        row = logits_row(seed, scale=0.1)
        p = SamplingParams(temperature=1.5, top_p=top_p, seed=seed)
        assert sample_token(row, p, seed) == int(torch.argmax(row))


def test_top_p_keeps_the_nucleus():
    row = torch.full((VOCAB,), -10.0)
    row[[3, 7, 11]] = torch.tensor([2.0, 1.9, 1.8])  # these three hold almost all the mass
    p = SamplingParams(temperature=1.0, top_p=0.5, seed=9)
    drawn = {sample_token(row, p, i) for i in range(200)}
    assert drawn <= {3, 7} and drawn == {3, 7}


def test_sample_batch_mixes_greedy_and_sampled_rows():
    logits = torch.stack([logits_row(s, scale=0.1) for s in range(6)])
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=1), SamplingParams(),
              SamplingParams(temperature=0.7, top_k=10, seed=2), SamplingParams(temperature=1.0, top_p=0.9, seed=3),
              SamplingParams(temperature=0.0, seed=99)]
    indices = [0, 3, 1, 4, 0, 8]
    out = sample_batch(logits, params, indices)
    expected = [int(torch.argmax(logits[i])) if p.greedy else sample_token(logits[i], p, indices[i])
                for i, p in enumerate(params)]
    assert out == expected
    assert out == [sample_token(logits[i], p, indices[i]) for i, p in enumerate(params)]
    assert sample_batch(logits, params, indices) == out


def test_denormal_temperature_is_greedy_not_a_crash():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 30
    params = [SamplingParams(temperature=1e-40, seed=1)] * 3
    assert sample_batch(logits, params, [0, 1, 2]) == logits.argmax(dim=-1).tolist()
