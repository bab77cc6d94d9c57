"""The reference backend's two attention paths agree, and match dense causal attention."""
from __future__ import annotations

import pytest
import torch

from engine.backends.torch_ref import paged_attention_ref, paged_decode_attention_ref


def paged_setup(context_lens: list[int], num_kv_heads=3, block_size=16, head_dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-c // block_size) for c in context_lens)
    num_blocks = sum(-(-c // block_size) for c in context_lens) + 3
    kc = torch.randn(num_blocks, num_kv_heads, block_size, head_dim, generator=g)
    vc = torch.randn(num_blocks, num_kv_heads, block_size, head_dim, generator=g)
    tables = torch.full((len(context_lens), max_blocks), -1, dtype=torch.int32)
    perm, k = torch.randperm(num_blocks, generator=g), 0
    for s, c in enumerate(context_lens):
        n = -(-c // block_size)
        tables[s, :n] = perm[k:k + n]
        k += n
    return kc, vc, tables, torch.tensor(context_lens, dtype=torch.int32)


@pytest.mark.parametrize("context_lens", [[1], [16, 17], [1, 15, 16, 33, 100], [64] * 4])
def test_decode_path_equals_general_path(context_lens):
    kc, vc, tables, ctx = paged_setup(context_lens)
    q = torch.randn(len(context_lens), 9, 64)
    starts = torch.arange(len(context_lens) + 1, dtype=torch.int32)
    general = paged_attention_ref(q, kc, vc, tables, ctx, starts, 0.125)
    decode = paged_decode_attention_ref(q, kc, vc, tables, ctx, 0.125)
    torch.testing.assert_close(decode, general, rtol=1e-5, atol=1e-5)


def test_general_path_equals_dense_causal_attention():
    kc, vc, tables, ctx = paged_setup([37])
    q = torch.randn(5, 9, 64)                       # the last 5 of 37 tokens: a chunk over a cached prefix
    out = paged_attention_ref(q, kc, vc, tables, ctx, torch.tensor([0, 5], dtype=torch.int32), 0.125)
    k = kc[tables[0, :3].long()].permute(1, 0, 2, 3).reshape(3, 48, 64)[:, :37].repeat_interleave(3, 0)
    v = vc[tables[0, :3].long()].permute(1, 0, 2, 3).reshape(3, 48, 64)[:, :37].repeat_interleave(3, 0)
    mask = torch.ones(5, 37, dtype=torch.bool).tril(diagonal=32)
    dense = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=0.125)
    torch.testing.assert_close(out, dense.transpose(0, 1), rtol=1e-5, atol=1e-5)
