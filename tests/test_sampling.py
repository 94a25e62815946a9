"""Sampling filters on hand-made logits with hand-computed expectations; seeded reproducibility."""

import math

import pytest
import torch

from model.generation.sampling import (
    SamplingParams, apply_min_p, apply_repetition_penalty, apply_temperature, apply_top_k,
    apply_top_p, make_generator, mark_seen, sample_next, seen_mask,
)

PROBS = [0.5, 0.3, 0.15, 0.05]
LOGITS = torch.tensor([[math.log(p) for p in PROBS]])  # (1, 4), softmax == PROBS
INF = float("-inf")


def kept(logits):
    return (logits[0] != INF).tolist()


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0, 4.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 4.0]]
    assert logits.tolist() == [[2.0, -2.0, 1.0, 4.0]]  # input untouched


def test_seen_mask_counts_prompt_and_ignores_padding():
    ids = torch.tensor([[0, 0, 5, 2], [1, 5, 5, 0]])
    attn = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    seen = seen_mask(ids, 6, attn)
    assert seen[0].nonzero().flatten().tolist() == [2, 5]  # pad id 0 not counted
    assert seen[1].nonzero().flatten().tolist() == [0, 1, 5]  # a real 0 is counted
    mark_seen(seen, torch.tensor([3, 4]))
    assert seen[0, 3] and seen[1, 4] and not seen[0, 4]


def test_temperature_scales():
    assert apply_temperature(torch.tensor([[2.0, -1.0]]), 0.5).tolist() == [[4.0, -2.0]]


def test_top_k_keeps_k_largest():
    assert kept(apply_top_k(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), 2)) == [False, True, True, False]
    assert kept(apply_top_k(LOGITS, 0)) == [True] * 4  # off


@pytest.mark.parametrize("p,expect", [
    (0.9, [True, True, True, False]),   # tail 0.05 <= 0.1 dropped
    (0.7, [True, True, False, False]),  # tail 0.05 + 0.15 = 0.2 <= 0.3 dropped; 0.5 + 0.3 >= 0.7
    (0.4, [True, False, False, False]),  # only the top token needed
    (0.0, [True, False, False, False]),  # never empty
    (1.0, [True, True, True, True]),   # off
])
def test_top_p_nucleus(p, expect):
    assert kept(apply_top_p(LOGITS, p)) == expect


def test_top_p_is_order_independent():
    perm = torch.tensor([2, 0, 3, 1])
    out = apply_top_p(LOGITS[:, perm], 0.7)
    assert kept(out) == [False, True, False, True]  # ids holding 0.5 and 0.3


@pytest.mark.parametrize("m,expect", [
    (0.2, [True, True, True, False]),   # floor 0.1 drops 0.05
    (0.5, [True, True, False, False]),  # floor 0.25 keeps 0.5 and 0.3
    (1.0, [True, False, False, False]),  # only the max survives
    (0.0, [True, True, True, True]),
])
def test_min_p_relative_to_max(m, expect):
    assert kept(apply_min_p(LOGITS, m)) == expect


def test_greedy_when_not_sampling_or_zero_temperature():
    logits = torch.tensor([[0.1, 0.9, 0.3], [2.0, 1.0, 2.0]])
    for params in (SamplingParams(do_sample=False, temperature=5.0), SamplingParams(do_sample=True, temperature=0)):
        assert sample_next(logits, params).tolist() == [1, 0]  # ties -> first index


def test_greedy_applies_repetition_penalty():
    logits = torch.tensor([[3.0, 2.0]])
    seen = torch.tensor([[True, False]])
    assert sample_next(logits, SamplingParams(repetition_penalty=2.0), seen=seen).tolist() == [1]
    assert sample_next(logits, SamplingParams(repetition_penalty=1.0), seen=seen).tolist() == [0]


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(do_sample=True, temperature=1.0)

    def draws(seed):
        g = make_generator(seed)
        return torch.stack([sample_next(logits, params, g) for _ in range(20)])

    assert torch.equal(draws(7), draws(7))
    assert not torch.equal(draws(7), draws(8))


def test_sampling_never_picks_filtered_tokens_and_follows_probabilities():
    logits = LOGITS.expand(4000, 4)
    g = make_generator(0)
    ids = sample_next(logits, SamplingParams(do_sample=True, top_p=0.7), g)
    freq = torch.bincount(ids, minlength=4).float() / ids.numel()
    assert freq[2] == 0 and freq[3] == 0
    assert abs(freq[0] - 0.5 / 0.8) < 0.03  # renormalised over the nucleus {0.5, 0.3}
    ids = sample_next(logits, SamplingParams(do_sample=True, temperature=1.0), g)
    freq = torch.bincount(ids, minlength=4).float() / ids.numel()
    assert torch.allclose(freq, torch.tensor(PROBS), atol=0.03)


def test_low_temperature_sharpens():
    logits = LOGITS.expand(2000, 4)
    ids = sample_next(logits, SamplingParams(do_sample=True, temperature=0.05), make_generator(1))
    assert (ids == 0).float().mean() > 0.99
