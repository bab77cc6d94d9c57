"""The INT8 CPU backend's native sampler (pa_sample_rows_cpu: the CUDA kernel's histogram algorithm, a core a
row) against engine/sampler.py's torch path and the one-row reference: exact tokens on power-of-two
probabilities, the one-row reference's tokens on mixed rows but for draws within rounding of a CDF step,
the torch path's values on awkward rows, greedy rows' argmax, and its input checks. Outputs are poisoned
before each call."""
from __future__ import annotations

import pytest
import torch

from engine.native import NativeError
from engine.sampler import Sampler, make_generator, row_knobs, sample_rows
from engine.sequence import SamplingParams
from tests.conftest import TINY
from tests.test_sampler import (AWKWARD_KINDS as KINDS, awkward_rows, draws_walk_the_cdf, follows_sample_rows,
                                generators_at, sampler_matches_one_row_reference)


@pytest.fixture(scope="module")
def backend():
    from engine.backends.cpu_int8 import CpuInt8Backend
    return CpuInt8Backend(TINY)


def native(backend, poison: int = -7):
    """sample_rows' contract through pa_sample_rows_cpu (what CpuInt8Backend.sample runs), poisoned first."""
    def draw(logits, params, generators):
        out = torch.full((logits.shape[0],), poison, dtype=torch.int64)
        return backend.sample_rows(logits, row_knobs(params, generators, logits.shape[1]), out=out)
    return draw


def test_native_sampler_walks_the_cdf(backend):
    draws_walk_the_cdf(native(backend))


@pytest.mark.parametrize("rows,vocab", [(1, 49152), (9, 1031), (24, 4096)])
def test_native_sampler_matches_the_one_row_reference(backend, rows, vocab):
    sampler_matches_one_row_reference("cpu", rows=rows, rounds=3, vocab=vocab,
                                      sampler=Sampler(sample=native(backend)))


@pytest.mark.parametrize("vocab", [1, 5, 1031, 49152])
def test_native_sampler_follows_sample_rows_on_awkward_rows(backend, vocab):
    """Every filter kind on awkward rows: a token of the value the torch path picks but for a draw within
    rounding of a CDF step, never a token without mass; top_k=1 and a one-token nucleus are the argmax;
    temperature 0 is torch.argmax and draws nothing."""
    base = awkward_rows(torch.Generator().manual_seed(vocab), vocab)
    logits = base.repeat(len(KINDS), 1)
    params = [SamplingParams(**kw) for kw in KINDS for _ in range(base.shape[0])]
    states = [make_generator(5 * i + vocab).getstate() for i in range(len(params))]
    follows_sample_rows(logits, params, native(backend)(logits, params, generators_at(states)), states)
    cold = [SamplingParams(temperature=0.0)] * base.shape[0]
    untouched = generators_at(states[:base.shape[0]])
    assert native(backend, poison=-3)(base, cold, untouched).tolist() == base.argmax(-1).tolist()
    assert [g.getstate() for g in untouched] == states[:base.shape[0]]


def test_cpu_int8_backend_samples_natively(backend):
    """CpuInt8Backend.sample is the native call (same tokens as sample_rows here: peaked rows, no draw near a
    step), and the same seeds give the same tokens."""
    logits = torch.randn(6, 3000, generator=torch.Generator().manual_seed(1)) * 6
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=50)] * 6
    a = backend.sample(logits, params, [make_generator(i) for i in range(6)])
    b = backend.sample(logits, params, [make_generator(i) for i in range(6)])
    assert a.dtype == torch.int64 and torch.equal(a, b)
    assert torch.equal(a, sample_rows(logits, params, [make_generator(i) for i in range(6)]))


def test_native_sampler_checks_its_inputs(backend):
    x = torch.randn(2, 10)
    with pytest.raises(NativeError, match="knobs must be float64"):
        backend.sample_rows(x, torch.zeros(2, 5))
    with pytest.raises(NativeError, match="knobs must be float64"):
        backend.sample_rows(x, torch.zeros(1, 5, dtype=torch.float64))
    with pytest.raises(NativeError, match="bad arguments"):
        backend.sample_rows(x[:, :0], torch.zeros(2, 5, dtype=torch.float64))
    assert backend.sample_rows(x[:0], torch.zeros(0, 5, dtype=torch.float64)).numel() == 0


def test_native_sampler_rows_on_the_pool_or_alone(backend):
    """Rows spread over the backend's pool give the tokens the caller alone gives (a backend without a pool),
    row for row."""
    from engine.backends.cpu_int8 import CpuInt8Backend
    alone = CpuInt8Backend(TINY, use_pool=False)
    logits = torch.randn(24, 4099, generator=torch.Generator().manual_seed(2)) * 2
    params = [SamplingParams(**KINDS[i % len(KINDS)]) for i in range(24)]
    knobs = row_knobs(params, [make_generator(i) for i in range(24)], logits.shape[1])
    got = backend.sample_rows(logits, knobs, out=torch.full((24,), -7, dtype=torch.int64))
    assert torch.equal(got, alone.sample_rows(logits, knobs, out=torch.full((24,), -5, dtype=torch.int64)))
