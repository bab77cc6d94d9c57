"""The batched sampler on the GPU: a step's logits stay there; every row's token must equal the one-row CPU
reference's (pick_one_row) on the same logits, with generators in the same states, except where a row's
target sits within rounding of its CDF's boundary (tests/test_sampler.py runs the same check on the CPU)."""
from __future__ import annotations

import pytest
import torch

from engine.sampler import Sampler, make_generator, row_knobs, upload
from engine.sequence import SamplingParams
from tests.test_sampler import (AWKWARD_KINDS as KINDS, MIXED, awkward_rows, draws_walk_the_cdf, follows_sample_rows,
                                generators_at, sampler_matches_one_row_reference)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="no CUDA GPU visible to torch: GPU sampler parity not run")]


@pytest.fixture(scope="module")
def kernels():
    from engine.backends.cuda import CudaKernels
    return CudaKernels()


def fused(kernels, gather_cap: int = -1, poison: int = -7, blocks_per_row: int = 0):
    """sample_rows' contract through the fused kernel (what CudaBackend.sample runs), its output poisoned
    before the launch."""
    def draw(logits, params, generators):
        knobs = upload(row_knobs(params, generators, logits.shape[1]), logits.device)
        out = torch.full((logits.shape[0],), poison, dtype=torch.int64, device=logits.device)
        return kernels.sample_rows(logits, knobs, out=out, gather_cap=gather_cap, blocks_per_row=blocks_per_row)
    return draw


# (the kernel picks a cluster of 4 blocks a row at 1 row, one block a row at 33 and 128)
@pytest.mark.parametrize("rows,vocab", [(128, 49152), (33, 128256), (1, 49152)])
@pytest.mark.parametrize("path", ["torch", "fused kernel"])
def test_gpu_sampler_matches_the_one_row_reference(rows, vocab, path, kernels):
    sampler = Sampler(sample=fused(kernels)) if path == "fused kernel" else Sampler()
    sampler_matches_one_row_reference("cuda", rows=rows, rounds=4, vocab=vocab, sampler=sampler)


@pytest.mark.parametrize("blocks_per_row", [1, 8])
@pytest.mark.parametrize("gather_cap", [-1, 0, 2])
def test_fused_kernel_walks_the_cdf(kernels, gather_cap, blocks_per_row):
    """Exact tokens on power-of-two probabilities (tests/test_sampler.py's draws_walk_the_cdf), through the
    gathered-bucket path, the bisection path (gather_cap 0), and a mix of both (2); one block a row, and a
    cluster of 8 (most of whose blocks hold a few elements of these short rows, or none)."""
    draws_walk_the_cdf(lambda x, p, g: fused(kernels, gather_cap, blocks_per_row=blocks_per_row)(x.cuda(), p, g).cpu())


@pytest.mark.parametrize("vocab", [1, 5, 1000, 1031, 49152])
def test_fused_kernel_paths_agree_and_follow_sample_rows(kernels, vocab):
    """On awkward rows with every filter kind: the gathered-bucket and bisection paths give the same token,
    bit for bit (same integer masses, same order), and so do clusters of 2, 4 and 8 blocks a row; a token of
    the value the torch path (sample_rows on the GPU) picks but for a draw within rounding of a CDF step;
    top_k=1 and a one-token nucleus are the argmax."""
    gen = torch.Generator().manual_seed(vocab)
    base = awkward_rows(gen, vocab)
    logits = base.repeat(len(KINDS), 1).cuda()                           # every row kind under every filter
    params = [SamplingParams(**kw) for kw in KINDS for _ in range(base.shape[0])]
    states = [make_generator(7 * i + vocab).getstate() for i in range(len(params))]
    fast = fused(kernels, blocks_per_row=1)(logits, params, generators_at(states))
    slow = fused(kernels, gather_cap=0, poison=-9, blocks_per_row=1)(logits, params, generators_at(states))
    assert torch.equal(fast, slow)
    for ranks in (2, 4, 8):     # a cluster a row, each block a slice: the same tokens, both paths
        assert torch.equal(fused(kernels, poison=-5, blocks_per_row=ranks)(logits, params, generators_at(states)),
                           fast), ranks
        assert torch.equal(fused(kernels, gather_cap=0, poison=-4, blocks_per_row=ranks)(logits, params,
                                                                                         generators_at(states)),
                           fast), ranks
    follows_sample_rows(logits, params, fast, states)


@pytest.mark.parametrize("vocab", [1, 5, 1031, 49152])
def test_fused_kernel_greedy_rows_take_the_argmax(kernels, vocab):
    """Temperature 0 (row_knobs' greedy rows, what the sampled decode graph runs for greedy requests and
    padding): torch.argmax's token -- the first largest -- on awkward rows (bf16 ties, one value
    throughout, -inf runs), with no uniform drawn; the sampled rows beside them draw as they would alone."""
    gen = torch.Generator().manual_seed(vocab + 1)
    base = awkward_rows(gen, vocab).cuda()
    n = base.shape[0]
    logits = torch.cat([base, base])
    params = [SamplingParams(temperature=0.0)] * n + [SamplingParams(**KINDS[i % len(KINDS)]) for i in range(n)]
    gens = [make_generator(300 + i) for i in range(2 * n)]
    states = [g.getstate() for g in gens]
    got = fused(kernels, blocks_per_row=1)(logits, params, gens)
    assert got[:n].tolist() == base.argmax(-1).tolist()
    for ranks in (2, 4, 8):
        assert torch.equal(fused(kernels, poison=-2, blocks_per_row=ranks)(logits, params, generators_at(states)),
                           got), ranks
    assert [g.getstate() for g in gens[:n]] == states[:n]               # greedy rows drew nothing
    assert torch.equal(got[n:], fused(kernels, poison=-3)(base, params[n:], generators_at(states[n:])))


def test_fused_kernel_checks_its_inputs(kernels):
    from engine.native import NativeError
    x = torch.randn(2, 10, device="cuda")
    knobs = torch.zeros(2, 5, dtype=torch.float64, device="cuda")
    with pytest.raises(NativeError, match="dtype"):
        kernels.sample_rows(x.double(), knobs)
    with pytest.raises(NativeError, match="shape"):
        kernels.sample_rows(x, knobs[:1])
    with pytest.raises(NativeError, match="blocks_per_row 3"):
        kernels.sample_rows(x, knobs, blocks_per_row=3)
    assert kernels.sample_rows(x[:0], knobs[:0]).numel() == 0


def test_gpu_sampler_uses_the_backends_argmax_and_is_repeatable():
    """Greedy rows through CudaBackend.argmax (two-pass), sampled rows on the GPU; the same seeds give the
    same tokens run after run, and the tokens come back as Python ints."""
    from engine.backends.cuda import argmax_rows
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(64, 49152, generator=g) * 3).cuda()
    params = [SamplingParams(**MIXED[i % len(MIXED)]) for i in range(64)]
    runs = []
    for _ in range(3):
        gens = [make_generator(50 + i) for i in range(64)]
        res = Sampler(argmax=argmax_rows)(logits, params, [[1, 2]] * 64, [[3]] * 64, gens)
        runs.append([r.token_id for r in res])
    assert runs[0] == runs[1] == runs[2]
    assert all(type(t) is int for t in runs[0])
    greedy = [i for i, p in enumerate(params) if p.is_greedy and p.repetition_penalty == 1.0]
    assert [runs[0][i] for i in greedy] == logits[greedy].argmax(-1).tolist()
