"""BlockManager: paged KV cache bookkeeping (free list, ref counts, prefix cache, fork + CoW). Ints only.

A sequence's block table maps its slot p to block table[p // block_size], offset p % block_size.
Every physical block is in exactly one state:
  free       ref 0, not cached, in the free list (FIFO);
  evictable  ref 0, cached, in the LRU list (oldest freed first out), still servable as a prefix hit;
  owned      ref > 0, in one or more block tables (cached or not).
A cached block is a full, computed block registered under the chained hash of (parent hash, tokens).
Its registration keeps the tokens and the uid of its parent's registration, so a lookup compares
tokens and the exact parent, never trusting a hash alone. Dropping a registration drops its
descendants too (nothing could reach them any more), so every cached block's parent is cached.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

_ROOT_HASH = 0x9E3779B97F4A7C15   # the chain's start, a fixed odd constant
_ROOT_UID = 0                     # the parent uid of a sequence's first block


class NoFreeBlocksError(RuntimeError):
    """Not enough free or evictable blocks for the request; nothing was changed."""


@dataclass(frozen=True)
class _CachedBlock:
    """One registration in the prefix cache."""

    hash: int
    parent_hash: int
    tokens: tuple[int, ...]
    uid: int          # unique per registration, never reused
    parent_uid: int   # uid of the registration holding the previous block, _ROOT_UID for block 0


class BlockManager:
    """Block tables, ref counts and the prefix cache for num_blocks blocks of block_size slots."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"block manager: {name} must be a positive integer, got {value!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()   # first = least recently freed
        self._ref = [0] * num_blocks
        self._tables: dict[int, list[int]] = {}
        self._num_slots: dict[int, int] = {}           # seq_id -> slots the table holds
        self._cached: dict[int, _CachedBlock] = {}     # block -> its registration
        self._hash_to_block: dict[int, int] = {}
        self._uid_to_block: dict[int, int] = {}
        self._children: dict[int, set[int]] = {}       # uid -> blocks registered under it
        self._next_uid = _ROOT_UID + 1
        self._prefix_queries = 0
        self._prefix_hits = 0

    # ----------------------------------------------------------------- counts
    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation may take: the free list plus evictable cached blocks."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks with ref_count > 0."""
        return self.num_blocks - self.num_free_blocks

    def usage(self) -> float:
        """Fraction of blocks in use."""
        return self.num_used_blocks / self.num_blocks

    def has_seq(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def get_block_table(self, seq_id: int) -> list[int]:
        """A copy of the seq's block table."""
        return list(self._table(seq_id))

    def num_slots(self, seq_id: int) -> int:
        """Slots the seq's table holds (what allocate / append_slots last asked for)."""
        self._table(seq_id)
        return self._num_slots[seq_id]

    def stats(self) -> dict:
        queries, hits = self._prefix_queries, self._prefix_hits
        return {"num_blocks": self.num_blocks, "num_free_blocks": self.num_free_blocks,
                "num_used_blocks": self.num_used_blocks, "num_cached_blocks": len(self._cached),
                "prefix_queries": queries, "prefix_hits": hits,
                "hit_rate": hits / queries if queries else 0.0}

    # ------------------------------------------------------------- allocation
    def num_cached_prefix_tokens(self, token_ids: list[int]) -> int:
        """Leading tokens a new seq with these tokens would get from the cache (never the last one)."""
        return len(self._match_prefix(token_ids)) * self.block_size

    def can_allocate(self, token_ids: list[int], num_tokens: int | None = None) -> bool:
        _, _, need = self._allocation_plan(token_ids, num_tokens)
        return need <= self.num_free_blocks

    def allocate(self, seq_id: int, token_ids: list[int], num_tokens: int | None = None) -> int:
        """Create seq_id's table for max(num_tokens, cached) slots; returns the cached token count."""
        if seq_id in self._tables:
            raise ValueError(f"block manager: seq {seq_id} already has a block table")
        hits, num_slots, need = self._allocation_plan(token_ids, num_tokens)
        if need > self.num_free_blocks:
            raise NoFreeBlocksError(f"seq {seq_id} needs {need} blocks, {self.num_free_blocks} free")
        for block in hits:                  # revive first, so taking new blocks cannot evict them
            if self._ref[block] == 0:
                del self._evictable[block]
            self._ref[block] += 1
        table = hits + [self._take_block() for _ in range(self._blocks_for(num_slots) - len(hits))]
        self._tables[seq_id] = table
        self._num_slots[seq_id] = num_slots
        self._prefix_queries += len(token_ids)
        self._prefix_hits += len(hits) * self.block_size
        return len(hits) * self.block_size

    def can_append(self, seq_id: int, num_new_tokens: int = 1) -> bool:
        cow_index, num_new = self._append_plan(seq_id, self.num_slots(seq_id) + num_new_tokens)
        return num_new + (cow_index is not None) <= self.num_free_blocks

    def append_slots(self, seq_id: int, num_total_tokens: int) -> list[tuple[int, int]]:
        """Grow seq_id's table to num_total_tokens slots; returns [(src, dst)] copies for CoW."""
        table, slots = self._tables.get(seq_id), self._num_slots.get(seq_id, 0)
        if table is not None and slots < num_total_tokens <= len(table) * self.block_size \
                and self._ref[table[slots // self.block_size]] == 1:
            self._num_slots[seq_id] = num_total_tokens      # the common decode step: room in an own block
            return []
        cow_index, num_new = self._append_plan(seq_id, num_total_tokens)
        need = num_new + (cow_index is not None)
        if need > self.num_free_blocks:
            raise NoFreeBlocksError(f"seq {seq_id} needs {need} blocks, {self.num_free_blocks} free")
        table = self._tables[seq_id]
        copies = []
        if cow_index is not None:
            src, dst = table[cow_index], self._take_block()
            self._ref[src] -= 1             # still > 0: it was shared
            table[cow_index] = dst
            copies.append((src, dst))
        table.extend(self._take_block() for _ in range(num_new))
        self._num_slots[seq_id] = max(self._num_slots[seq_id], num_total_tokens)
        return copies

    def fork(self, parent_id: int, child_id: int) -> None:
        """child_id shares every block of parent_id; the first write to a shared block copies it."""
        table = self._table(parent_id)
        if child_id in self._tables:
            raise ValueError(f"block manager: seq {child_id} already has a block table")
        for block in table:
            self._ref[block] += 1
        self._tables[child_id] = list(table)
        self._num_slots[child_id] = self._num_slots[parent_id]

    def free(self, seq_id: int) -> None:
        """Release seq_id's blocks, tail first, so a cached prefix is evicted from its end."""
        table = self._tables.pop(seq_id, None)
        if table is None:
            return
        del self._num_slots[seq_id]
        for block in reversed(table):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if block in self._cached:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    # ----------------------------------------------------------- prefix cache
    def mark_computed(self, seq_id: int, token_ids: list[int], num_computed_tokens: int) -> None:
        """Register every full block among the first num_computed_tokens tokens. Idempotent."""
        table = self._table(seq_id)
        if not 0 <= num_computed_tokens <= min(len(token_ids), self._num_slots[seq_id]):
            raise ValueError(f"block manager: seq {seq_id}: num_computed_tokens {num_computed_tokens} "
                             f"outside 0..min(len(token_ids), slots)")
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        parent_hash, parent_uid = _ROOT_HASH, _ROOT_UID
        for i in range(num_computed_tokens // bs):
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            block_hash = self._chain_hash(parent_hash, tokens)
            entry = self._cached.get(table[i])
            if entry is not None:
                if entry.tokens != tokens or entry.parent_uid != parent_uid:
                    raise ValueError(f"block manager: seq {seq_id}: block {i} was registered "
                                     f"with other tokens")
            else:
                other = self._hash_to_block.get(block_hash)
                if other is None:
                    entry = self._register(table[i], block_hash, parent_hash, tokens, parent_uid)
                else:               # a copy (dup) or a hash collision; ours stays unregistered
                    entry = self._cached[other]
                    if entry.tokens != tokens or entry.parent_uid != parent_uid:
                        return      # collision: nothing after this block could be found
            parent_hash, parent_uid = block_hash, entry.uid

    def reset_prefix_cache(self) -> None:
        """Forget every registration; evictable blocks become free."""
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._cached.clear()
        self._hash_to_block.clear()
        self._uid_to_block.clear()
        self._children.clear()

    @staticmethod
    def _chain_hash(parent_hash: int, tokens: tuple[int, ...]) -> int:
        return hash((parent_hash, tokens))

    def _match_prefix(self, token_ids: list[int]) -> list[int]:
        """Cached blocks holding the leading full blocks of token_ids, at most (len-1)//block_size."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        blocks: list[int] = []
        parent_hash, parent_uid = _ROOT_HASH, _ROOT_UID
        for i in range(max(len(token_ids) - 1, 0) // bs):
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            block_hash = self._chain_hash(parent_hash, tokens)
            block = self._hash_to_block.get(block_hash)
            if block is None:
                break
            entry = self._cached[block]
            if entry.tokens != tokens or entry.parent_uid != parent_uid:
                break
            blocks.append(block)
            parent_hash, parent_uid = block_hash, entry.uid
        return blocks

    def _register(self, block: int, block_hash: int, parent_hash: int, tokens: tuple[int, ...],
                  parent_uid: int) -> _CachedBlock:
        entry = _CachedBlock(block_hash, parent_hash, tokens, self._next_uid, parent_uid)
        self._next_uid += 1
        self._cached[block] = entry
        self._hash_to_block[block_hash] = block
        self._uid_to_block[entry.uid] = block
        if parent_uid != _ROOT_UID:
            self._children.setdefault(parent_uid, set()).add(block)
        return entry

    def _uncache(self, block: int) -> None:
        """Drop block's registration and its descendants'; evictable descendants become free."""
        stack = [block]
        while stack:
            b = stack.pop()
            entry = self._cached.pop(b)
            del self._hash_to_block[entry.hash]
            del self._uid_to_block[entry.uid]
            siblings = self._children.get(entry.parent_uid)
            if siblings is not None:
                siblings.discard(b)
                if not siblings:
                    del self._children[entry.parent_uid]
            for child in self._children.pop(entry.uid, ()):
                if self._ref[child] == 0:
                    del self._evictable[child]
                    self._free.append(child)
                stack.append(child)

    # ---------------------------------------------------------------- helpers
    def _table(self, seq_id: int) -> list[int]:
        table = self._tables.get(seq_id)
        if table is None:
            raise KeyError(f"block manager: unknown seq {seq_id}")
        return table

    def _blocks_for(self, num_slots: int) -> int:
        return -(-num_slots // self.block_size)

    def _take_block(self) -> int:
        """A block with ref 1: from the free list, else the least recently freed evictable one."""
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            self._uncache(block)
        self._ref[block] = 1
        return block

    def _allocation_plan(self, token_ids: list[int], num_tokens: int | None) -> tuple[list[int], int, int]:
        """(prefix hit blocks, slots of the new table, free-count units it consumes)."""
        num_tokens = len(token_ids) if num_tokens is None else num_tokens
        if num_tokens < 0:
            raise ValueError(f"block manager: num_tokens must be >= 0, got {num_tokens}")
        hits = self._match_prefix(token_ids)
        num_slots = max(num_tokens, len(hits) * self.block_size)
        revived = sum(1 for block in hits if self._ref[block] == 0)
        return hits, num_slots, self._blocks_for(num_slots) - len(hits) + revived

    def _append_plan(self, seq_id: int, num_total_tokens: int) -> tuple[int | None, int]:
        """(index of the shared block the next write lands in, or None; new blocks needed)."""
        table = self._table(seq_id)
        if num_total_tokens < 0:
            raise ValueError(f"block manager: num_total_tokens must be >= 0, got {num_total_tokens}")
        # Writes start at the first new slot; with no growth, the caller writes its last slot.
        write_pos = min(self._num_slots[seq_id], num_total_tokens - 1)
        index = write_pos // self.block_size
        is_shared = 0 <= write_pos and index < len(table) and self._ref[table[index]] > 1
        num_new = max(0, self._blocks_for(num_total_tokens) - len(table))
        return (index if is_shared else None), num_new

    # ------------------------------------------------------------- invariants
    def check_invariants(self) -> None:
        """Assert the books balance (tests call this after every step)."""
        free, evictable = list(self._free), list(self._evictable)
        assert len(set(free)) == len(free), "duplicate in the free list"
        assert not set(free) & set(evictable), "block both free and evictable"
        refs = [0] * self.num_blocks
        for seq_id, table in self._tables.items():
            assert len(set(table)) == len(table), f"seq {seq_id}: a block twice in one table"
            assert len(table) == self._blocks_for(self._num_slots[seq_id]), f"seq {seq_id}: table size"
            for block in table:
                refs[block] += 1
        assert refs == self._ref, "ref counts differ from the block tables"
        free_set, evictable_set = set(free), set(evictable)
        for block in range(self.num_blocks):
            if self._ref[block] > 0:
                assert block not in free_set and block not in evictable_set, f"owned block {block} listed"
            elif block in self._cached:
                assert block in evictable_set, f"cached block {block} with ref 0 not evictable"
            else:
                assert block in free_set, f"block {block} leaked"
        self._check_cache()

    def _check_cache(self) -> None:
        assert len(self._hash_to_block) == len(self._cached) == len(self._uid_to_block)
        if not self.enable_prefix_caching:
            assert not self._cached, "prefix caching is off but blocks are cached"
        for block_hash, block in self._hash_to_block.items():
            entry = self._cached[block]
            assert entry.hash == block_hash, f"block {block}: stored hash differs from the map's"
            assert len(entry.tokens) == self.block_size, f"block {block}: not a full block"
            assert self._chain_hash(entry.parent_hash, entry.tokens) == block_hash, f"block {block}: tokens"
            assert self._uid_to_block[entry.uid] == block
            if entry.parent_uid != _ROOT_UID:
                parent = self._uid_to_block.get(entry.parent_uid)
                assert parent is not None, f"block {block}: parent registration gone"
                assert self._cached[parent].hash == entry.parent_hash, f"block {block}: parent hash"
                assert block in self._children[entry.parent_uid]
            else:
                assert entry.parent_hash == _ROOT_HASH
        for uid, children in self._children.items():
            assert children and uid in self._uid_to_block, f"stale children of uid {uid}"
            assert all(self._cached[c].parent_uid == uid for c in children)
