"""Sampler: filters, penalties, seeded generators, logprobs; the batched path token for token against the
one-row reference (pick_one_row), on the CPU here and on the GPU in test_cuda_sampler.py."""
from __future__ import annotations

import math
import random

import pytest
import torch

import engine.sampler as sampler_module
from engine.sampler import (Sampler, apply_penalties, filter_rows, make_generator, pick_one_row, sample_rows,
                            uniform)
from engine.sequence import SamplingParams


def kept_mask(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """filter_rows' candidates of one row as a mask over the vocabulary."""
    vals, ids, keep, _ = filter_rows(row[None], [p])
    if ids is None:
        return torch.ones_like(row, dtype=torch.bool) if keep is None else keep[0]
    return torch.zeros(row.shape[-1], dtype=torch.bool).index_fill_(0, ids[0][keep[0]], True)


def filtered(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The scaled row with everything filter_rows drops at -inf."""
    return (row / p.temperature).masked_fill(~kept_mask(row, p), float("-inf"))


def test_top_k_top_p_min_p_masks():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]))
    kept = lambda **kw: kept_mask(logits, SamplingParams(**kw)).tolist()
    assert kept(top_k=2) == [True, True, False, False, False]
    assert kept(top_p=0.5) == [True, False, False, False, False]        # the first token alone reaches 0.5
    assert kept(top_p=0.8) == [True, True, True, False, False]          # 0.75 < 0.8, so the third stays
    assert kept(min_p=0.25) == [True, True, True, False, False]         # p >= 0.125
    assert kept(temperature=0.5, top_k=0) == [True] * 5


def test_temperature_sharpens():
    logits = torch.tensor([2.0, 1.0, 0.0])
    p1 = filtered(logits, SamplingParams(temperature=1.0)).softmax(-1)
    p2 = filtered(logits, SamplingParams(temperature=0.5)).softmax(-1)
    assert p2[0] > p1[0]


def test_penalties():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = apply_penalties(logits.clone(), SamplingParams(repetition_penalty=2.0), [0], [1])
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]
    out = apply_penalties(logits.clone(), SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [0], [2, 2])
    assert out.tolist() == [2.0, -2.0, 1.0 - 0.5 - 0.5, 0.5]
    out = apply_penalties(logits.clone(), SamplingParams(repetition_penalty=2.0), [0, 1, 0], [1, 0])
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]                     # once per token, however often seen


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


@pytest.fixture(params=["top-m search", "whole rows sorted"])
def row_sort(request, monkeypatch):
    """Both ways filter_rows finds a nucleus: the CPU's doubling top-m search, and the GPU's whole sort."""
    monkeypatch.setattr(sampler_module, "sorts_whole_rows", lambda device: request.param == "whole rows sorted")
    return request.param


def test_filters_match_a_full_sort_on_a_large_vocabulary(row_sort):
    """Nuclei from a handful of tokens to tens of thousands (top_p 0.999 on a flat row), rows with different
    filters in one call: the doubling top-m search keeps the tokens a float64 full sort keeps; they may
    part only on a token whose preceding mass is within rounding of top_p."""
    gen = torch.Generator().manual_seed(11)
    ranked = [{"top_p": 0.9}, {"top_p": 0.999}, {"top_p": 0.5, "top_k": 100},
              {"top_p": 0.95, "min_p": 0.1, "temperature": 0.7}, {"top_k": 7}, {"top_k": 3000, "top_p": 0.99}]
    unranked = [{"min_p": 0.05}, {"temperature": 1.3}, {"min_p": 0.2, "temperature": 0.5}]
    for scale in (0.3, 3.0, 12.0):
        for group in (ranked, unranked):
            logits = torch.randn(len(group), 49152, generator=gen) * scale
            params = [SamplingParams(**kw) for kw in group]
            vals, ids, keep, _ = filter_rows(logits.clone(), params)
            for i, p in enumerate(params):
                if ids is None:
                    got = torch.ones(49152, dtype=torch.bool) if keep is None else keep[i]
                else:
                    got = torch.zeros(49152, dtype=torch.bool).index_fill_(0, ids[i][keep[i]], True)
                    assert (vals[i][keep[i]].diff() <= 0).all()           # descending: the walk's order
                want = reference_mask(logits[i], p)
                differ = (got != want).nonzero()[:, 0]
                assert len(differ) <= 1, (scale, group[i], len(differ))
                if len(differ):                          # exclusive cumulative mass in float64 at those tokens
                    probs = (logits[i].double() / p.temperature).softmax(-1)
                    before = probs[probs > probs[differ].max()].sum()
                    assert abs(float(before) - p.top_p) < 1e-5, (scale, group[i], float(before))
                assert got.sum() > 0


MIXED = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.7, top_p=0.9),
         dict(temperature=0.8, top_k=40), dict(temperature=1.2, min_p=0.05), dict(top_k=50, top_p=0.95, min_p=0.02),
         dict(temperature=0.6, top_p=0.5), dict(temperature=1.0, repetition_penalty=1.3),
         dict(temperature=0.9, top_p=0.8, presence_penalty=0.5, frequency_penalty=0.3),
         dict(temperature=0.0, repetition_penalty=1.2), dict(temperature=2.0, top_k=5)]


def sampler_matches_one_row_reference(device: str, rows: int, rounds: int, vocab: int = 49152,
                                      sampler: Sampler | None = None) -> None:
    """Sampler over a batch of mixed rows (greedy, penalties, every filter; some rows with tokens at
    -inf, as min_tokens masks EOS) against pick_one_row on each row alone, on the CPU, with generators in
    the same states: the same tokens, except where the row's target u * total lies within rounding of a
    boundary of the reference's CDF (the batched path sums in float64 what the reference sums in float32,
    in another order)."""
    gen = torch.Generator().manual_seed(rows)
    params = [SamplingParams(**MIXED[i % len(MIXED)]) for i in range(rows)]
    prompts = [torch.randint(0, vocab, (int(torch.randint(0, 40, (), generator=gen)),), generator=gen).tolist()
               for _ in range(rows)]
    outputs = [torch.randint(0, vocab, (int(torch.randint(0, 20, (), generator=gen)),), generator=gen).tolist()
               for _ in range(rows)]
    ours = [make_generator(1000 + i) for i in range(rows)]
    theirs = [make_generator(1000 + i) for i in range(rows)]
    sampler = sampler or Sampler()
    near = 0
    for r in range(rounds):
        scale = (0.5, 2.0, 6.0)[r % 3]
        logits = torch.randn(rows, vocab, generator=gen) * scale
        logits[::7, :3] = float("-inf")
        before = logits.clone()
        on_device = logits.to(device)
        got = [x.token_id for x in sampler(on_device, params, prompts, outputs, ours)]
        assert torch.equal(on_device.cpu(), before), "the sampler changed its input (penalties go on a copy)"
        for i, p in enumerate(params):
            probe = random.Random()
            probe.setstate(theirs[i].getstate())
            want = pick_one_row(logits[i].clone(), p, prompts[i], outputs[i], theirs[i])
            if got[i] == want:
                continue
            # the reference's CDF and target for this row: the target must sit on a boundary
            row = apply_penalties(logits[i].clone(), p, prompts[i], outputs[i])
            from engine.sampler import candidates
            ids, kept = candidates(row, p)
            cdf = kept.double().softmax(-1).cumsum(-1)
            u = uniform(probe)
            gap = (cdf - u).abs().min().item()
            assert gap < 1e-5, (device, r, i, p, got[i], want, gap)
            near += 1
    assert near <= max(2, rows * rounds // 100), near


def test_batched_sampler_matches_the_one_row_reference(row_sort):
    sampler_matches_one_row_reference("cpu", rows=44, rounds=6)


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


def test_greedy_rows_use_the_backends_argmax_and_sampled_rows_its_draw():
    """Greedy rows without penalties go through the argmax the engine hands in (the backend's), sampled
    rows through its draw (sample), each group once, its tokens back in the batch's order."""
    seen = []

    def argmax(x):
        seen.append(("argmax", tuple(x.shape)))
        return x.argmax(-1)

    def sample(x, params, generators):
        seen.append(("sample", tuple(x.shape), len(params), len(generators)))
        return sample_rows(x, params, generators)
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0], [0.0, 0.0, 9.0]])
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0), SamplingParams(top_k=1)]
    res = Sampler(argmax=argmax, sample=sample)(logits, params, [[]] * 3, [[]] * 3, [None] * 3)
    assert [r.token_id for r in res] == [1, 0, 2]
    assert seen == [("argmax", (2, 3)), ("sample", (1, 3), 1, 1)]


class FixedUniform:
    """A generator whose every uniform() is the given multiple of 2^-24."""

    def __init__(self, u: float):
        self.bits = int(u * 2 ** 24)
        assert self.bits * 2.0 ** -24 == u

    def getrandbits(self, k: int) -> int:
        return self.bits


# Probabilities that are powers of two, so that every CDF step sits on a multiple of 1/16 (or 1/7 after
# min-p renormalises): (params, the tokens in the order the inverse CDF walks them, their weights).
DYADIC = [0.125, 0.5, 0.0625, 0.25, 0.0625]
WALKS = [(dict(temperature=1.0), [0, 1, 2, 3, 4], [2, 8, 1, 4, 1]),                 # index order
         (dict(top_p=0.999), [1, 3, 0, 2, 4], [8, 4, 2, 1, 1]),                      # descending, ties by index
         (dict(top_p=0.7), [1, 3], [8, 4]),                                          # 0.5 + 0.25 reaches 0.7
         (dict(top_k=2), [1, 3], [8, 4]),
         (dict(top_k=4, top_p=0.95), [1, 3, 0, 2], [8, 4, 2, 1]),                    # 0.875 < 0.95 * 0.9375
         (dict(min_p=0.2), [0, 1, 3], [2, 8, 4]),                                    # p >= 0.1, index order
         (dict(top_p=0.999, min_p=0.2), [1, 3, 0], [8, 4, 2])]


def draws_walk_the_cdf(draw) -> None:
    """draw(logits [n, vocab], params, generators) -> tokens [n]: on logits whose probabilities are
    powers of two, 64 uniforms between the CDF's steps give exactly the token whose step holds them, for
    every filter kind: the walk's order (index order unfiltered or min-p only, descending once top-k or
    top-p cuts, equal values by index) and each filter's cut."""
    logits = torch.tensor(DYADIC, dtype=torch.float64).log().float()
    us = [(j + 0.5) / 64 for j in range(64)]
    for kw, order, weights in WALKS:
        edges = torch.tensor(weights, dtype=torch.float64).cumsum(0) / sum(weights)
        want = [order[int((edges <= u).sum())] for u in us]
        p = SamplingParams(**kw)
        got = draw(logits[None].expand(len(us), -1).contiguous(), [p] * len(us), [FixedUniform(u) for u in us])
        assert got.tolist() == want, (kw, got.tolist(), want)


def test_draws_walk_the_cdf(row_sort):
    draws_walk_the_cdf(sample_rows)


# ---- shared with the native samplers' tests (tests/test_cuda_sampler.py, tests/test_cpu_sampler.py) ---------
def awkward_rows(gen: torch.Generator, vocab: int) -> torch.Tensor:
    """Rows a bucket histogram can trip on: flat and peaked random rows, bf16-rounded ones (hundreds of
    tokens a value, as a bf16 lm_head gives), a row of one value, rows with -inf runs, a single finite
    value, huge spreads (most of the row without mass)."""
    rows = [torch.randn(vocab, generator=gen) * s for s in (0.3, 1.0, 4.0, 30.0)]
    rows += [(torch.randn(vocab, generator=gen) * s).bfloat16().float() for s in (1.0, 3.0, 8.0)]
    rows.append(torch.full((vocab,), 0.25))
    r = torch.randn(vocab, generator=gen)
    r[::3] = float("-inf")
    rows.append(r)
    r = torch.full((vocab,), float("-inf"))
    r[vocab // 2] = 1.0
    rows.append(r)
    r = torch.randn(vocab, generator=gen) * 2
    r[: vocab // 2] = -1e4
    rows.append(r)
    return torch.stack(rows)


# every filter kind, alone and together, that the awkward rows are sampled under
AWKWARD_KINDS = [dict(temperature=1.0), dict(temperature=0.7, top_p=0.9), dict(top_p=0.999), dict(top_k=1),
                 dict(top_k=40, temperature=0.05), dict(top_k=3000, top_p=0.5), dict(min_p=0.1),
                 dict(top_p=0.95, min_p=0.02), dict(temperature=1.5, top_p=0.3, top_k=7), dict(top_p=1e-6)]


def generators_at(states: list) -> list[random.Random]:
    """Fresh generators in the given states (Random.getstate()): the same uniforms drawn again."""
    out = [make_generator(0) for _ in states]
    for g, st in zip(out, states):
        g.setstate(st)
    return out


def follows_sample_rows(logits: torch.Tensor, params: list[SamplingParams], got: torch.Tensor, states: list) -> None:
    """got [n]: a native sampler's tokens for logits' rows under params, drawn by generators in `states`.
    Each is in range and never a token without mass, top_k=1 and a one-token nucleus are the argmax, and
    its value is the one sample_rows picks from the same states but for draws within rounding of a CDF step
    (at most max(2, n / 50) rows)."""
    n, vocab = logits.shape
    assert (got >= 0).all() and (got < vocab).all()
    finite = torch.isfinite(logits).any(-1)                             # (vocab 1: a row of -inf)
    assert torch.isfinite(logits.gather(1, got[:, None]))[finite].all()    # never a token without mass
    greedy = [i for i, p in enumerate(params) if (p.top_k == 1 or p.top_p == 1e-6) and finite[i]]
    assert got[greedy].tolist() == logits[greedy].argmax(-1).tolist()
    ref = sample_rows(logits, params, generators_at(states))
    # equal values may come in another order from torch's topk: compare the chosen values
    differ = (logits.gather(1, got[:, None]) != logits.gather(1, ref[:, None])).nonzero()[:, 0].tolist()
    assert len(differ) <= max(2, n // 50), (len(differ), n, [(i, params[i]) for i in differ])


def test_penalties_of_many_rows_at_once_equal_the_one_row_form():
    """penalise_rows (one mask, one scatter) gives apply_penalties' logits, bit for bit, row by row: rows
    with each penalty alone, all of them, none that applies (no history), and tokens seen many times."""
    from engine.sampler import penalise_rows
    gen = torch.Generator().manual_seed(21)
    kinds = [dict(repetition_penalty=1.3), dict(presence_penalty=0.5), dict(frequency_penalty=-0.7),
             dict(repetition_penalty=0.8, presence_penalty=-1.0, frequency_penalty=0.3), dict(repetition_penalty=1.2)]
    n, vocab = 12, 3000
    params = [SamplingParams(temperature=1.0, **kinds[i % len(kinds)]) for i in range(n)]
    prompts = [torch.randint(0, 50, (int(torch.randint(0, 30, (), generator=gen)),), generator=gen).tolist()
               for _ in range(n)]
    outputs = [torch.randint(0, 80, (int(torch.randint(0, 40, (), generator=gen)),), generator=gen).tolist()
               for _ in range(n)]
    prompts[4], outputs[4] = [], []                 # nothing to penalise
    outputs[1] = []                                 # presence with no output yet
    logits = torch.randn(n, vocab, generator=gen) * 3
    rows = [0, 1, 2, 3, 4, 5, 7, 8, 9, 11]          # not every row, out of the batch's order of params
    got = logits.clone()
    penalise_rows(got, rows, params, prompts, outputs)
    for i in range(n):
        want = apply_penalties(logits[i].clone(), params[i], prompts[i], outputs[i]) if i in rows else logits[i]
        assert torch.equal(got[i], want), i
    assert not torch.equal(got[3], logits[3])


def test_pending_tokens_count_as_appended():
    """penalise_rows' pending token (the pipelined step's, still on the device) penalises as if output_ids
    held it already: same logits, bit for bit, including a row with no output yet."""
    from engine.sampler import penalise_rows
    gen = torch.Generator().manual_seed(5)
    params = [SamplingParams(temperature=1.0, repetition_penalty=1.4), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.0, presence_penalty=0.6, frequency_penalty=0.4),
              SamplingParams(temperature=1.0, repetition_penalty=0.9, frequency_penalty=-0.5)]
    prompts = [[1, 2, 3], [4], [5, 6], [7, 7]]
    outputs = [[9, 9], [8], [], [3]]
    pending = torch.tensor([9, 1, 6, 3])
    logits = torch.randn(4, 64, generator=gen) * 2
    rows = [0, 2, 3]
    got, want = logits.clone(), logits.clone()
    penalise_rows(got, rows, params, prompts, outputs, pending)
    penalise_rows(want, rows, params, prompts, [o + [int(t)] for o, t in zip(outputs, pending)])
    assert torch.equal(got, want)
    assert not torch.equal(got[2], logits[2])             # the pending token alone is penalised in row 2


def test_a_row_without_a_finite_logit_still_gets_a_token(row_sort):
    """A row of -inf (nothing left to sample: a NaN CDF) gets a token in range under every filter kind,
    beside ordinary rows that keep theirs; no out-of-range index reaches a gather (on a GPU that is a
    device-side assert, which ends the process's CUDA context)."""
    kinds = [dict(temperature=1.0), dict(top_p=0.9), dict(top_k=5), dict(min_p=0.1), dict(top_k=3, top_p=0.5)]
    for kw in kinds:
        logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
        logits[1] = float("-inf")
        p = [SamplingParams(**kw)] * 3
        got = sample_rows(logits, p, [make_generator(i) for i in range(3)])
        assert ((got >= 0) & (got < 50)).all(), (kw, got)
        assert torch.isfinite(logits[[0, 2], got[[0, 2]]]).all()
