"""Batch: the flat int arrays one engine step hands to the model, built once per step."""
from __future__ import annotations

from dataclasses import dataclass

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
        """Build from (new_token_ids, num_computed_before, block_table) per sequence."""
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        starts = [0]
        ctx: list[int] = []
        logits_rows: list[int] = []
        max_blocks = max((len(t) for _, _, t in seqs), default=1) or 1
        tables = torch.full((len(seqs), max_blocks), -1, dtype=torch.int32)
        for s, (new_ids, num_computed, table) in enumerate(seqs):
            for j, token in enumerate(new_ids):
                p = num_computed + j
                ids.append(token)
                pos.append(p)
                slots.append(table[p // block_size] * block_size + p % block_size)
            starts.append(len(ids))
            ctx.append(num_computed + len(new_ids))
            if table:
                tables[s, : len(table)] = torch.tensor(table, dtype=torch.int32)
            if want_logits[s]:
                logits_rows.append(len(ids) - 1)
        query_lens = [b - a for a, b in zip(starts, starts[1:])]
        return Batch(
            input_ids=torch.tensor(ids, dtype=torch.int64),
            positions=torch.tensor(pos, dtype=torch.int64),
            slot_mapping=torch.tensor(slots, dtype=torch.int32),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            context_lens=torch.tensor(ctx, dtype=torch.int32),
            block_tables=tables,
            logits_indices=torch.tensor(logits_rows, dtype=torch.int64),
            max_query_len=max(query_lens, default=0),
            max_context_len=max(ctx, default=0),
            block_size=block_size,
        )
