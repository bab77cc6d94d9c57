"""Sampler: filters, penalties, seeded generators, logprobs."""
from __future__ import annotations

import math

import torch

from engine.sampler import Sampler, apply_penalties, filter_logits, make_generator
from engine.sequence import SamplingParams


def test_top_k_top_p_min_p_masks():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]))
    kept = lambda **kw: torch.isfinite(filter_logits(logits.clone(), SamplingParams(**kw))).tolist()
    assert kept(top_k=2) == [True, True, False, False, False]
    assert kept(top_p=0.5) == [True, False, False, False, False]        # the first token alone reaches 0.5
    assert kept(top_p=0.8) == [True, True, True, False, False]          # 0.75 < 0.8, so the third stays
    assert kept(min_p=0.25) == [True, True, True, False, False]         # p >= 0.125
    assert kept(temperature=0.5, top_k=0) == [True] * 5


def test_temperature_sharpens():
    logits = torch.tensor([2.0, 1.0, 0.0])
    p1 = filter_logits(logits, SamplingParams(temperature=1.0)).softmax(-1)
    p2 = filter_logits(logits, SamplingParams(temperature=0.5)).softmax(-1)
    assert p2[0] > p1[0]


def test_penalties():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = apply_penalties(logits.clone(), SamplingParams(repetition_penalty=2.0), [0], [1])
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]
    out = apply_penalties(logits.clone(), SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [0], [2, 2])
    assert out.tolist() == [2.0, -2.0, 1.0 - 0.5 - 0.5, 0.5]


def test_seeded_rows_do_not_depend_on_their_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(3, 100)
    p = SamplingParams(temperature=1.0, seed=5)
    other = SamplingParams(temperature=1.3)
    s = Sampler()
    alone = [s(logits[1:2], [p], [[]], [[]], [make_generator(5)])[0].token_id for _ in range(3)]
    mixed = [s(logits, [other, p, other], [[]] * 3, [[]] * 3,
               [make_generator(9), make_generator(5), make_generator(1)])[1].token_id for _ in range(3)]
    assert alone == mixed and len(set(alone)) == 1


def test_greedy_and_logprobs():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    s = Sampler()
    res = s(logits, [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=0.0)],
            [[], []], [[], []], [None, None])
    assert [r.token_id for r in res] == [1, 0]
    expected = 3.0 - math.log(math.exp(0) + math.exp(3) + math.exp(1))
    assert abs(res[0].logprob - expected) < 1e-6
    assert [t for t, _ in res[0].top_logprobs] == [1, 2]
    assert res[1].logprob is None and res[1].top_logprobs is None


def reference_mask(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The textbook filters over a full sort, in float64 (what candidates() must match without sorting)."""
    logits = logits.double() / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < torch.topk(logits, p.top_k).values[-1], float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    if p.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return torch.isfinite(logits)


def test_filters_match_a_full_sort_on_a_large_vocabulary():
    """Nuclei from a handful of tokens to tens of thousands (top_p 0.999 on a flat row): the doubling
    top-m search keeps the tokens a float64 full sort keeps; they may part only on a token whose
    preceding mass is within rounding of top_p."""
    gen = torch.Generator().manual_seed(11)
    for scale in (0.3, 3.0, 12.0):
        logits = torch.randn(49152, generator=gen) * scale
        for kw in ({"top_p": 0.9}, {"top_p": 0.999}, {"top_p": 0.5, "top_k": 100}, {"min_p": 0.05},
                   {"top_p": 0.95, "min_p": 0.1, "temperature": 0.7}, {"top_k": 7}):
            p = SamplingParams(**kw)
            got = torch.isfinite(filter_logits(logits.clone(), p))
            want = reference_mask(logits.clone(), p)
            differ = (got != want).nonzero()[:, 0]
            assert len(differ) <= 1, (scale, kw, len(differ))
            if len(differ):                              # exclusive cumulative mass in float64 at those tokens
                probs = (logits.double() / p.temperature).softmax(-1)
                before = probs[probs > probs[differ].max()].sum()
                assert abs(float(before) - p.top_p) < 1e-5, (scale, kw, float(before))
            assert got.sum() > 0


def test_sampled_frequencies_follow_the_filtered_distribution():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04]))
    p = SamplingParams(temperature=1.0, top_p=0.85, seed=3)      # nucleus: the first three (0.9 of the mass)
    s, gen = Sampler(), make_generator(3)
    n = 6000
    counts = torch.zeros(5)
    for _ in range(n):
        counts[s(logits[None], [p], [[]], [[]], [gen])[0].token_id] += 1
    expected = torch.tensor([0.4, 0.3, 0.2, 0.0, 0.0]) / 0.9
    assert counts[3:].sum() == 0
    assert ((counts / n - expected).abs() <= 4 * (expected * (1 - expected) / n).sqrt() + 1e-9).all(), counts / n


def test_greedy_rows_use_the_backends_argmax():
    """Greedy rows without penalties go through the argmax the engine hands in (the backend's)."""
    seen = []

    def argmax(x):
        seen.append(tuple(x.shape))
        return x.argmax(-1)
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    res = Sampler(argmax=argmax)(logits, [SamplingParams(temperature=0.0)] * 2, [[], []], [[], []], [None, None])
    assert [r.token_id for r in res] == [1, 0] and seen == [(2, 3)]
