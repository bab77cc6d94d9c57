"""The CUDA backend's prefill graph buckets and their default limit (pure arithmetic: runs without a GPU)."""
from __future__ import annotations

import pytest

from engine.backends.cuda import (GRAPH_BATCH_SIZES, PREFILL_MIN_SPAN, prefill_context_bucket, prefill_graph_bucket,
                                  prefill_graph_default)
from engine.config import ModelConfig


def config(hidden, inter, layers, heads, kv_heads, head_dim) -> ModelConfig:
    return ModelConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, rope_theta=1e4, rms_norm_eps=1e-5,
                       max_position_embeddings=8192, tie_word_embeddings=True, name="t")


@pytest.mark.parametrize("tokens, seqs, want", [
    (1, 1, (16, 1)), (16, 1, (16, 1)), (17, 1, (32, 1)), (261, 8, (512, 8)), (600, 101, (1024, 128)),
    (22, 20, (32, 32)), (20, 20, (32, 32)), (1024, 1, (1024, 1)), (1025, 3, (2048, 4)),
    (8192, 1, (8192, 1)), (8193, 1, None), (200, 129, None)])
def test_bucket(tokens, seqs, want):
    assert prefill_graph_bucket(tokens, seqs, 8192) == want


def test_bucket_holds_the_step():
    for tokens in range(1, 3000, 7):
        for seqs in (1, 2, 3, 5, 8, 9, 31, 64, 100, 128):
            if seqs > tokens:
                continue
            b = prefill_graph_bucket(tokens, seqs, 4096)
            assert b is not None and b[0] >= tokens and b[1] >= seqs and b[0] >= b[1] and b[1] in GRAPH_BATCH_SIZES
            assert b[0] & (b[0] - 1) == 0 and (b[0] == 16 or b[0] < 2 * max(tokens, b[1]))


def test_limit_caps_the_bucket():
    assert prefill_graph_bucket(600, 1, 1000) is None          # its bucket (1024) is past the limit
    assert prefill_graph_bucket(500, 1, 1000) == (512, 1)
    assert prefill_graph_bucket(1, 1, 0) is None


def test_default_limit_follows_the_model_size():
    smol = config(576, 1536, 30, 9, 3, 64)                     # ~0.2 GFLOP a token: host-bound up to 8k
    llama1b = config(2048, 8192, 16, 32, 8, 64)
    llama8b = config(4096, 14336, 32, 32, 8, 128)
    assert prefill_graph_default(smol) == 8192
    assert prefill_graph_default(llama1b) == 1024
    assert prefill_graph_default(llama8b) == 256
    assert prefill_graph_default(config(8192, 28672, 80, 64, 8, 128)) == 64       # 70B-like
    assert prefill_graph_default(config(32768, 131072, 8, 256, 8, 128)) == 16     # the smallest bucket


def test_context_bucket():
    """Contexts too short for the prefill kernel to split its keys share one bucket; past it, powers of two
    up to the graphs' largest context."""
    floor = 2 * PREFILL_MIN_SPAN
    assert [prefill_context_bucket(c, 8192) for c in (1, floor, floor + 1, 3000, 4096, 4097, 8192)] == \
        [floor, floor, 2 * floor, 4096, 4096, 8192, 8192]
    assert prefill_context_bucket(300, 256) == 256


class _NoEvent:
    """torch.cuda.Event's two calls _StepGraph makes, for a CPU run of its host-side layout."""

    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


@pytest.fixture
def cpu_graph_inputs(monkeypatch):
    """_StepGraph on the CPU: no pinned memory, no CUDA events (only its input layout is under test)."""
    import torch

    from engine.backends import cuda
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: empty(*a, **k))
    monkeypatch.setattr(torch.cuda, "Event", _NoEvent)
    return cuda._StepGraph


def test_prefill_graph_inputs(cpu_graph_inputs):
    """A mixed step of 3 sequences (24 rows) in a (32 rows, 8 sequences) graph: rows past 24 write nowhere
    (slot -1) and belong to no sequence; sequences past 3 have no rows and context 0."""
    from engine.batch import Batch
    g = cpu_graph_inputs(8, 4, 16, None, None, "cpu", tokens=32, prefill=True, context=1024)
    assert g.batch.query_start_loc.tolist() == [0] * 9 and g.batch.max_query_len == 32
    assert g.batch.max_context_len == 1024
    step = Batch.build([([1, 2, 3], 0, [0]), ([4] * 20, 0, [1, 2]), ([9], 5, [3])], 16, [True, False, True])
    view = g.load(step)
    b = g.batch
    assert b.input_ids.tolist()[:24] == step.input_ids.tolist() and b.input_ids.tolist()[24:] == [0] * 8
    assert b.slot_mapping.tolist()[:24] == step.slot_mapping.tolist() and b.slot_mapping.tolist()[24:] == [-1] * 8
    assert b.positions.tolist()[:24] == step.positions.tolist()
    assert b.query_start_loc.tolist() == [0, 3, 23, 24, 24, 24, 24, 24, 24]
    assert b.context_lens.tolist() == [3, 20, 6, 0, 0, 0, 0, 0]
    assert b.logits_indices.tolist()[:2] == [2, 23]
    assert b.block_tables.tolist()[:3] == [[0, -1, -1, -1], [1, 2, -1, -1], [3, -1, -1, -1]]
    assert (view.num_tokens, view.num_seqs, view.logits_indices.tolist(), view.graph) == (24, 3, [2, 23], g)


def test_decode_graph_inputs_keep_their_layout(cpu_graph_inputs):
    """A decode graph of 4 rows: one row a sequence, padding rows of slot -1 and context 0, query_start_loc
    0..4 (the layout greedy_advance and the decode kernels read)."""
    from engine.batch import Batch
    g = cpu_graph_inputs(4, 4, 16, 256, 1, "cpu")
    g.load(Batch.build([([7], 3, [5]), ([8], 9, [6])], 16, [True, True]))
    b = g.batch
    assert b.max_query_len == 1 and b.max_context_len == 64
    assert b.input_ids.tolist() == [7, 8, 0, 0] and b.slot_mapping.tolist() == [83, 105, -1, -1]
    assert b.context_lens.tolist() == [4, 10, 0, 0] and b.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert b.block_tables.tolist() == [[5, -1, -1, -1], [6, -1, -1, -1], [-1] * 4, [-1] * 4]
    assert g.ints.numel() == 6 * 4 + 1 + 4 * 4        # ids | positions | slots | ctx | rows | qsl | tables


# ---- the start-up warm-up's keys: every step an Engine can take ---------------------------------
def keyed_backend(cfg: ModelConfig, graph_max_context: int = 8192):
    """A CudaBackend with only what graph_keys() and the step-to-key functions read: the library's own tile
    size (a host function) and an H200's 132 SMs."""
    from engine import native
    from engine.backends.cuda import CudaBackend, CudaKernels
    b = CudaBackend.__new__(CudaBackend)
    k = CudaKernels.__new__(CudaKernels)
    k.lib, k.num_sms = native.load("cuda"), 132
    b.config, b.kernels, b.use_cuda_graphs, b.prefill_impl = cfg, k, True, None
    b.graph_max_context, b.prefill_graph_tokens = graph_max_context, prefill_graph_default(cfg)
    return b


@pytest.mark.parametrize("shape, limits", [
    ((576, 1536, 30, 9, 3, 64), (64, 8192, 8192)),          # SmolLM2-135M, the server's limits
    ((576, 1536, 30, 9, 3, 64), (8, 256, 3000)),             # small limits: fewer sizes and contexts
    ((2048, 8192, 16, 32, 8, 64), (32, 8192, 8192)),         # 1B-like: graphs up to 1024 tokens
    ((4096, 14336, 32, 32, 8, 128), (128, 2048, 8192))])     # 8B-like: up to 256
def test_warmup_keys_cover_every_step(shape, limits):
    """Random steps within an Engine's limits (sequences, tokens a step, context): the graph each one would
    replay -- decode (size, split, kind) or prefill (tokens, sequences, context) -- is among graph_keys(),
    which the start-up warm-up captures; and graph_keys() names no graph twice."""
    import random

    from engine.backends.cuda import prefill_graph_bucket
    b = keyed_backend(config(*shape))
    max_seqs, max_tokens, max_len = limits
    decode, prefill = b.graph_keys(max_seqs, max_tokens, max_len)
    assert len(set(decode)) == len(decode) and len(set(prefill)) == len(prefill)
    decode, prefill = set(decode), set(prefill)
    rng = random.Random(0)
    seen_split = set()
    for _ in range(20000):
        seqs = rng.randint(1, max_seqs)
        ctx = rng.randint(1, max_len)
        size = next(s for s in GRAPH_BATCH_SIZES if s >= seqs)
        for kind in ("logits", "tokens"):
            assert (size, ctx > b._graph_partition(size), kind) in decode, (seqs, ctx, kind)
        tokens = max(seqs, min(max_tokens, int(2 ** rng.uniform(0, 14))))   # every sequence has a row
        bucket = prefill_graph_bucket(tokens, seqs, b.prefill_graph_tokens)
        if bucket is None:
            continue
        key = (*bucket, b._prefill_context_key(*bucket, ctx))
        assert key in prefill, (tokens, seqs, ctx, key)
        if key[2] != b.graph_max_context:
            seen_split.add(key)
    assert seen_split, "no sampled step had a split-keys graph"
    assert all(t <= b.prefill_graph_tokens and s <= t for t, s, _ in prefill)
