"""Batch.build: flat arrays for mixed prefill chunks and decodes."""
from __future__ import annotations

import torch

from engine.batch import Batch


def test_build_mixed_chunks_and_decodes():
    # seq 0: a 3-token chunk after 14 computed (crosses a block boundary); seq 1: one decode token at 16;
    # seq 2: a whole 2-token prompt that does not want logits.
    b = Batch.build([([7, 8, 9], 14, [4, 9]), ([5], 16, [2, 3]), ([1, 2], 0, [6])], 16, [True, True, False])
    assert b.input_ids.tolist() == [7, 8, 9, 5, 1, 2]
    assert b.positions.tolist() == [14, 15, 16, 16, 0, 1]
    assert b.slot_mapping.tolist() == [4 * 16 + 14, 4 * 16 + 15, 9 * 16 + 0, 3 * 16 + 0, 6 * 16, 6 * 16 + 1]
    assert b.query_start_loc.tolist() == [0, 3, 4, 6]
    assert b.context_lens.tolist() == [17, 17, 2]
    assert b.block_tables.tolist() == [[4, 9], [2, 3], [6, -1]]
    assert b.logits_indices.tolist() == [2, 3]
    assert (b.max_query_len, b.max_context_len, b.num_seqs, b.num_tokens) == (3, 17, 3, 6)
    assert b.slot_mapping.dtype == torch.int32 and b.input_ids.dtype == torch.int64
    assert not b.is_decode_only


def test_build_decode_only():
    b = Batch.build([([3], 0, [1]), ([4], 31, [0, 5])], 16, [True, True])
    assert b.is_decode_only and b.slot_mapping.tolist() == [16, 5 * 16 + 15]


def test_build_tables_ragged_and_empty():
    """Block tables of any lengths are left-aligned and padded with -1; no sequences gives empty arrays."""
    import random
    rng = random.Random(3)
    seqs = [([1], rng.randrange(0, 16 * n), [rng.randrange(1000) for _ in range(n)]) for n in (1, 7, 2, 5, 3)]
    seqs = [(ids, min(c, 16 * len(t) - 1), t) for ids, c, t in seqs]
    b = Batch.build(seqs, 16, [True] * len(seqs))
    assert b.block_tables.tolist() == [t + [-1] * (7 - len(t)) for _, _, t in seqs]
    empty = Batch.build([], 16, [])
    assert empty.num_seqs == 0 and empty.num_tokens == 0 and tuple(empty.block_tables.shape) == (0, 1)
