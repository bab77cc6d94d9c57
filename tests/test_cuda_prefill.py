"""Prefill attention through SDPA (engine.backends.cuda.sdpa_paged_prefill / plan_prefill): the page gather,
the lower-right causal mask of a chunk on a cached prefix and the long / short split run on the CPU here
(against torch_ref's paged attention); on a GPU, CudaBackend.paged_attention with the split against the
paged kernel and the float64 reference."""
from __future__ import annotations

import pytest
import torch

from engine.backends.cuda import PrefillPlan, plan_prefill, prefill_route_min_work, prefill_work, sdpa_paged_prefill
from engine.backends.torch_ref import paged_attention_ref
from engine.batch import Batch

HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU visible to torch: CUDA prefill route not run")


def paged(ctx_lens, q_lens, nh, nkv, hd, bs, seed, device="cpu", dtype=torch.float32):
    """Random K/V in shuffled blocks (unused slots NaN), queries, and the host Batch of the step."""
    g = torch.Generator().manual_seed(seed)
    blocks_per = [-(-c // bs) for c in ctx_lens]
    total = sum(blocks_per) + 2
    perm = torch.randperm(total, generator=g).tolist()
    kc = torch.full((total, nkv, bs, hd), float("nan"))
    vc = torch.full((total, nkv, bs, hd), float("nan"))
    tables, used = [], 0
    for c, n in zip(ctx_lens, blocks_per):
        ids = perm[used:used + n]
        used += n
        tables.append(ids)
        for j, b in enumerate(ids):
            m = min(bs, c - j * bs)
            kc[b, :, :m] = torch.randn(nkv, m, hd, generator=g)
            vc[b, :, :m] = torch.randn(nkv, m, hd, generator=g)
    seqs = [([0] * q, c - q, t) for c, q, t in zip(ctx_lens, q_lens, tables)]
    batch = Batch.build(seqs, bs, [True] * len(seqs))
    q = torch.randn(sum(q_lens), nh, hd, generator=g)
    return q.to(device, dtype), kc.to(device, dtype), vc.to(device, dtype), batch


CASES = [  # (context lens, query lens, nh, nkv, hd)
    ([300], [300], 8, 2, 64),                  # a whole prompt (L == ctx), GQA 4, partial last page
    ([700], [260], 9, 3, 64),                  # a chunk on a cached prefix, SmolLM2's group of 3
    ([512, 40], [256, 40], 4, 4, 32),          # MHA; one long chunk beside a short one
]


@pytest.mark.parametrize("ctx_lens,q_lens,nh,nkv,hd", CASES)
def test_sdpa_paged_prefill_matches_the_reference(ctx_lens, q_lens, nh, nkv, hd):
    q, kc, vc, batch = paged(ctx_lens, q_lens, nh, nkv, hd, 16, seed=sum(ctx_lens) + nh)
    ref = paged_attention_ref(q, kc, vc, batch.block_tables, batch.context_lens, batch.query_start_loc, hd ** -0.5)
    starts = batch.query_start_loc.tolist()
    for s, c in enumerate(batch.context_lens.tolist()):
        r0, r1 = starts[s], starts[s + 1]
        out = sdpa_paged_prefill(q[r0:r1], kc, vc, batch.block_tables[s], c, hd ** -0.5)
        assert not out.isnan().any()           # the NaN slots past the context were not read
        torch.testing.assert_close(out, ref[r0:r1], rtol=1e-4, atol=1e-4)


def test_default_route_threshold_follows_the_heads():
    """SDPA from 64 GFLOP of causal prompt at head_dim 64 and 32 at 128 (measured crossovers, H200)."""
    assert prefill_route_min_work(32, 64) == 64e9 // (4 * 32 * 64)         # 1B-like: 7.8M pairs (~3,950^2 / 2)
    assert prefill_route_min_work(32, 128) == 32e9 // (4 * 32 * 128)       # Llama-3-8B: 1.95M pairs
    assert prefill_work(8192, 8192) >= prefill_route_min_work(9, 64) > prefill_work(4096, 4096)   # SmolLM2
    assert prefill_work(2048, 8192) < prefill_route_min_work(32, 64) < prefill_work(8192, 8192)


def test_sdpa_paged_prefill_rejects_more_queries_than_context():
    q, kc, vc, batch = paged([40], [40], 2, 2, 32, 16, seed=1)
    with pytest.raises(ValueError, match="query tokens"):
        sdpa_paged_prefill(q, kc, vc, batch.block_tables[0], 20, 1.0)


def test_plan_prefill_splits_long_and_short_sequences():
    _, _, _, batch = paged([300, 5, 900, 64], [300, 1, 260, 64], 2, 2, 32, 16, seed=2)
    # prefill_work: 300 x 300 -> 45,150 causal pairs; 260 on a 640-token prefix -> 200,330 / 2 = 100,165
    assert prefill_work(300, 300) == 45150 and prefill_work(260, 900) == 100165 and prefill_work(1, 5) == 2
    assert plan_prefill(batch, "cpu", min_work=100166) is None         # no chunk that big
    plan = plan_prefill(batch, "cpu", min_work=45150)                  # 300 x 300 and 260 x 900 go
    assert isinstance(plan, PrefillPlan)
    assert plan.long == [(0, 300, 300, 0), (301, 561, 900, 2)]
    assert plan.rows.tolist() == [300] + list(range(561, 625))      # the short sequences' q rows, in order
    assert plan.query_start_loc.tolist() == [0, 1, 65]
    assert plan.context_lens.tolist() == [5, 64]
    assert torch.equal(plan.block_tables, batch.block_tables[[1, 3]])
    assert plan.max_query_len == 64
    only_long = plan_prefill(batch, "cpu", min_work=1)
    assert only_long.rows is None and len(only_long.long) == 4


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ctx_lens,q_lens,nh,nkv,hd", [
    ([1100, 3, 300, 2600], [1100, 1, 20, 600], 32, 8, 64),      # prompt, decode row, short chunk, long chunk
    ([700, 513], [700, 257], 9, 3, 64),                         # SmolLM2's heads
    ([2048], [2048], 32, 8, 128),
])
def test_cuda_backend_prefill_route_matches_kernel_and_reference(dtype, ctx_lens, q_lens, nh, nkv, hd):
    from engine.backends.cuda import CudaBackend
    from engine.config import ModelConfig
    cfg = ModelConfig(vocab_size=64, hidden_size=nh * hd, intermediate_size=64, num_layers=1, num_heads=nh,
                      num_kv_heads=nkv, head_dim=hd, max_position_embeddings=4096)
    q, kc, vc, host = paged(ctx_lens, q_lens, nh, nkv, hd, 16, seed=sum(ctx_lens) + nh, device="cuda", dtype=dtype)
    kd, vd = torch.nan_to_num(kc.double().cpu()), torch.nan_to_num(vc.double().cpu())
    ref = paged_attention_ref(q.double().cpu(), kd, vd, host.block_tables, host.context_lens, host.query_start_loc,
                              hd ** -0.5)
    outs = {}
    for route, min_work in (("sdpa", 256 * 256), ("kernel", 1 << 62)):
        be = CudaBackend(cfg, dtype=dtype, use_cuda_graphs=False, prefill_sdpa_min_work=min_work)
        be.allocate_kv_cache(kc.shape[0], 16)
        be.key_caches[0].copy_(kc)
        be.value_caches[0].copy_(vc)
        batch = be.prepare(host)
        assert (batch.prefill is not None) == (route == "sdpa")
        torch.full((64 << 20,), float("nan"), device="cuda")       # poison the allocator's free blocks
        out = be.paged_attention(0, q, batch)
        torch.cuda.synchronize()
        assert not out.isnan().any(), route
        err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
        assert err <= 1e-2, (route, err)
        outs[route] = out
    diff = ((outs["sdpa"].float() - outs["kernel"].float()).norm() / outs["kernel"].float().norm()).item()
    assert diff <= 1e-2
