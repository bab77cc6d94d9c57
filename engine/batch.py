"""Batch: the flat int arrays one engine step hands to the model, built once per step."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    """One step's work. All tensors live on the CPU; backends move what they need.

    Sequence s owns query rows query_start_loc[s] .. query_start_loc[s+1]-1; those are the
    last query_lens[s] tokens of its context_lens[s] tokens (prefix + earlier chunks + these).
    """

    input_ids: torch.Tensor        # [num_tokens] int64
    positions: torch.Tensor        # [num_tokens] int64
    slot_mapping: torch.Tensor     # [num_tokens] int32, block_id * block_size + offset
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    context_lens: torch.Tensor     # [num_seqs] int32, tokens in the cache after this step
    block_tables: torch.Tensor     # [num_seqs, max_blocks_per_seq] int32, padded with -1
    logits_indices: torch.Tensor   # [num_logits] int64, rows whose logits are wanted
    max_query_len: int
    max_context_len: int
    block_size: int
    # The input ids already on the backend's device (a pipelined decode step: the previous step's argmax,
    # not yet read by the host); input_ids then holds placeholders. Only backends with supports_async.
    device_input_ids: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    @staticmethod
    def build(seqs: list[tuple[list[int], int, list[int]]], block_size: int,
              want_logits: list[bool]) -> "Batch":
        """Build from (new_token_ids, num_computed_before, block_table) per sequence (vectorized)."""
        n = len(seqs)
        query_lens = np.fromiter((len(ids) for ids, _, _ in seqs), np.int64, n)
        computed = np.fromiter((c for _, c, _ in seqs), np.int64, n)
        starts = np.zeros(n + 1, np.int64)
        np.cumsum(query_lens, out=starts[1:])
        total = int(starts[-1])
        ids = np.fromiter(itertools.chain.from_iterable(ids for ids, _, _ in seqs), np.int64, total)
        table_lens = np.fromiter((len(t) for _, _, t in seqs), np.int64, n)
        max_blocks = int(table_lens.max(initial=1)) or 1
        tables = np.full((n, max_blocks), -1, np.int32)
        # every row's table left-aligned, in one masked store (row-major: the flat order of the tables)
        tables[np.arange(max_blocks) < table_lens[:, None]] = np.fromiter(
            itertools.chain.from_iterable(t for _, _, t in seqs), np.int32, int(table_lens.sum()))
        owner = np.repeat(np.arange(n), query_lens)                          # [num_tokens] sequence index
        pos = np.arange(total) - starts[:-1][owner] + computed[owner]
        slots = tables[owner, pos // block_size].astype(np.int64) * block_size + pos % block_size
        ctx = computed + query_lens
        rows = (starts[1:] - 1)[np.asarray(want_logits, dtype=bool)] if n else np.zeros(0, np.int64)
        return Batch(
            input_ids=torch.from_numpy(ids),
            positions=torch.from_numpy(pos),
            slot_mapping=torch.from_numpy(slots.astype(np.int32)),
            query_start_loc=torch.from_numpy(starts.astype(np.int32)),
            context_lens=torch.from_numpy(ctx.astype(np.int32)),
            block_tables=torch.from_numpy(tables),
            logits_indices=torch.from_numpy(rows.astype(np.int64)),
            max_query_len=int(query_lens.max()) if n else 0,
            max_context_len=int(ctx.max()) if n else 0,
            block_size=block_size,
        )
