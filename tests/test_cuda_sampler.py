"""The batched sampler on the GPU: a step's logits stay there; every row's token must equal the one-row CPU
reference's (pick_one_row) on the same logits, with generators in the same states, except where a row's
target sits within rounding of its CDF's boundary (tests/test_sampler.py runs the same check on the CPU)."""
from __future__ import annotations

import pytest
import torch

from engine.sampler import Sampler, make_generator
from engine.sequence import SamplingParams
from tests.test_sampler import MIXED, sampler_matches_one_row_reference

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="no CUDA GPU visible to torch: GPU sampler parity not run")]


@pytest.mark.parametrize("rows,vocab", [(128, 49152), (33, 128256), (1, 49152)])
def test_gpu_sampler_matches_the_one_row_reference(rows, vocab):
    sampler_matches_one_row_reference("cuda", rows=rows, rounds=4, vocab=vocab)


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
