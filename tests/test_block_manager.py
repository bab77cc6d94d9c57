"""BlockManager: unit tests plus a hypothesis state machine with a shadow KV cache."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.block_manager import BlockManager, NoFreeBlocksError


class CollidingBlockManager(BlockManager):
    """Every chain hash lands in one of 3 buckets: lookups must compare tokens and parents."""

    @staticmethod
    def _chain_hash(parent_hash, tokens):
        return (parent_hash + sum(tokens)) % 3


def _snapshot(bm: BlockManager) -> dict:
    return copy.deepcopy(vars(bm))


# ------------------------------------------------------------------------ unit tests
@pytest.mark.parametrize("kwargs, name", [
    ({"num_blocks": 0, "block_size": 16}, "num_blocks"),
    ({"num_blocks": -3, "block_size": 16}, "num_blocks"),
    ({"num_blocks": 4.0, "block_size": 16}, "num_blocks"),
    ({"num_blocks": 4, "block_size": 0}, "block_size"),
    ({"num_blocks": 4, "block_size": True}, "block_size"),
])
def test_constructor_validates(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BlockManager(**kwargs)


def test_allocate_sizes_table_and_counts():
    bm = BlockManager(10, 4)
    assert bm.allocate(1, [5] * 9) == 0
    assert len(bm.get_block_table(1)) == 3
    assert bm.num_used_blocks == 3 and bm.num_free_blocks == 7 and bm.usage() == pytest.approx(0.3)
    assert bm.allocate(2, [5] * 9, num_tokens=2) == 0          # chunked: capacity for 2 slots only
    assert len(bm.get_block_table(2)) == 1
    with pytest.raises(ValueError, match="already"):
        bm.allocate(1, [1])
    bm.check_invariants()


def test_cow_after_fork_copies_once_and_parent_keeps_its_block():
    bm = BlockManager(8, 4)
    bm.allocate(1, list(range(6)))                       # blocks: one full, one holding 2 of 4
    parent = bm.get_block_table(1)
    bm.fork(1, 2)
    assert bm.get_block_table(2) == parent
    copies = bm.append_slots(2, 7)                       # child's next write lands in the shared block
    child = bm.get_block_table(2)
    assert len(copies) == 1 and copies[0][0] == parent[1] and copies[0][1] == child[1]
    assert child[0] == parent[0] and child[1] not in parent
    assert bm.get_block_table(1) == parent               # parent keeps its block
    assert bm.append_slots(1, 7) == []                   # now private again
    bm.check_invariants()


def test_fork_at_block_boundary_needs_no_copy():
    bm = BlockManager(8, 4)
    bm.allocate(1, list(range(8)))
    bm.fork(1, 2)
    assert bm.append_slots(2, 9) == [] and bm.append_slots(1, 9) == []
    assert bm.get_block_table(1)[:2] == bm.get_block_table(2)[:2]
    assert bm.get_block_table(1)[2] != bm.get_block_table(2)[2]
    bm.free(1)
    bm.free(2)
    bm.check_invariants()
    assert bm.num_free_blocks == 8


def test_prefix_hit_200_tokens_reuses_12_blocks():
    bm = BlockManager(64, 16)
    ids = list(range(1000, 1200))
    assert bm.allocate(1, ids) == 0
    bm.mark_computed(1, ids, 200)
    assert bm.stats()["num_cached_blocks"] == 12
    assert bm.num_cached_prefix_tokens(ids) == 192
    assert bm.can_allocate(ids)
    assert bm.allocate(2, ids) == 192
    first, second = bm.get_block_table(1), bm.get_block_table(2)
    assert len(second) == 13 and second[:12] == first[:12] and second[12] != first[12]
    stats = bm.stats()
    assert stats["prefix_queries"] == 400 and stats["prefix_hits"] == 192
    assert stats["hit_rate"] == pytest.approx(192 / 400)
    assert bm.num_cached_prefix_tokens(ids[:192]) == 176   # never all: the last token is computed
    assert bm.num_cached_prefix_tokens(ids[:100] + [0] * 100) == 96
    bm.check_invariants()


def test_prefix_hit_on_freed_blocks_revives_them():
    bm = BlockManager(16, 4)
    ids = list(range(10))
    bm.allocate(1, ids)
    bm.mark_computed(1, ids, 10)
    table = bm.get_block_table(1)
    bm.free(1)
    assert bm.num_free_blocks == 16 and bm.stats()["num_cached_blocks"] == 2
    assert bm.allocate(2, ids) == 8
    assert bm.get_block_table(2)[:2] == table[:2]
    assert bm.num_used_blocks == 3
    bm.check_invariants()


def test_can_allocate_counts_evictable_hits_but_not_in_use_hits():
    bm = BlockManager(4, 2)
    ids = [1, 1, 2, 2, 3]
    bm.allocate(1, ids)
    bm.mark_computed(1, ids, 5)                          # two full blocks cached, in use
    assert bm.num_free_blocks == 1
    assert bm.can_allocate(ids)                          # hits in use cost nothing: 1 new block
    assert not bm.can_allocate(ids, num_tokens=7)        # 2 new blocks, 1 free
    bm.free(1)                                           # 1 free + 2 evictable (+ the old tail)
    assert bm.num_free_blocks == 4
    bm.allocate(2, [9, 9, 9, 9])                         # takes the 2 free blocks
    assert bm.num_free_blocks == 2 and bm.num_cached_prefix_tokens(ids) == 4
    assert bm.can_allocate(ids, num_tokens=4)            # revive 2 evictable, 0 new: 2 units
    assert not bm.can_allocate(ids)                      # revive 2 + 1 new: 3 units > 2
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(3, ids)
    bm.check_invariants()


def test_lru_evicts_least_recently_freed_only_when_free_list_empty():
    bm = BlockManager(4, 2)
    a, b = [1, 1, 9], [2, 2, 9]
    bm.allocate(1, a)
    bm.mark_computed(1, a, 3)
    bm.allocate(2, b)
    bm.mark_computed(2, b, 3)
    bm.free(1)                                           # a's first block: oldest evictable
    bm.free(2)
    assert bm.num_free_blocks == 4 and bm.stats()["num_cached_blocks"] == 2
    bm.allocate(3, [5, 5, 5, 5])                         # free list has 2: no eviction
    assert bm.num_cached_prefix_tokens(a) == 2 and bm.num_cached_prefix_tokens(b) == 2
    bm.allocate(4, [6])                                  # free list empty: evict a (freed first)
    assert bm.num_cached_prefix_tokens(a) == 0 and bm.num_cached_prefix_tokens(b) == 2
    bm.allocate(5, [7])
    assert bm.num_cached_prefix_tokens(b) == 0 and bm.num_free_blocks == 0
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(6, [8])
    bm.check_invariants()


def test_revived_block_becomes_most_recently_freed():
    bm = BlockManager(3, 2)
    a, b = [1, 1, 9], [2, 2, 9]
    for seq_id, ids in ((1, a), (2, b)):
        bm.allocate(seq_id, ids, num_tokens=2)
        bm.mark_computed(seq_id, ids, 2)
    bm.free(1)
    bm.free(2)                                           # LRU: a, b
    bm.allocate(3, a, num_tokens=2)                      # hit on a's block: revived
    bm.free(3)                                           # LRU: b, a
    bm.allocate(4, [7, 7, 7, 7])                         # 1 free + evicts b
    assert bm.num_cached_prefix_tokens(a) == 2 and bm.num_cached_prefix_tokens(b) == 0
    bm.check_invariants()


def test_prefix_tail_is_evicted_before_its_head():
    bm = BlockManager(5, 2)
    ids = list(range(9))                                 # 4 full blocks + 1 token
    bm.allocate(1, ids)
    bm.mark_computed(1, ids, 9)
    bm.free(1)
    assert bm.num_cached_prefix_tokens(ids) == 8
    bm.allocate(2, [7])                                  # takes the one free block
    bm.allocate(3, [7])                                  # evicts the tail block
    assert bm.num_cached_prefix_tokens(ids) == 6
    bm.check_invariants()


def _head_cached_by_one_seq_tail_by_another(bm):
    """seq 1 owns the cached head block; seq 2 owns a dup of it and the cached tail."""
    ids = [1, 1, 2, 2, 9]
    bm.allocate(1, ids[:3])                              # blocks 0, 1
    bm.allocate(2, ids)                                  # blocks 2, 3, 4: nothing cached yet
    bm.mark_computed(1, ids[:3], 3)                      # block 0: the head
    bm.mark_computed(2, ids, 5)                          # block 2: dup; block 3: tail under block 0
    assert bm.stats()["num_cached_blocks"] == 2 and bm.num_cached_prefix_tokens(ids) == 4
    return ids


def test_evicting_a_head_uncaches_its_in_use_descendants():
    bm = BlockManager(6, 2)
    ids = _head_cached_by_one_seq_tail_by_another(bm)
    bm.free(1)                                           # head evictable; free list: 5, 1
    bm.allocate(3, [7] * 6)                              # 5, 1, then evicts the head
    assert bm.stats()["num_cached_blocks"] == 0 and bm.num_cached_prefix_tokens(ids) == 0
    bm.check_invariants()
    bm.mark_computed(2, ids, 5)                          # the dup now registers as the head
    assert bm.num_cached_prefix_tokens(ids) == 4
    bm.check_invariants()


def test_evicting_a_head_frees_its_evictable_descendants():
    bm = BlockManager(6, 2)
    ids = _head_cached_by_one_seq_tail_by_another(bm)
    bm.free(1)
    bm.free(2)                                           # LRU: head (0), tail (3)
    assert bm.num_free_blocks == 6
    bm.allocate(3, [7] * 10)                             # 5, 1, 4, 2 free, then evicts the head
    assert bm.stats()["num_cached_blocks"] == 0 and bm.num_free_blocks == 1
    assert list(bm._free) == [3]                         # the orphaned tail went to the free list
    bm.check_invariants()


def test_no_free_blocks_leaves_state_unchanged():
    bm = BlockManager(4, 2)
    bm.allocate(1, [1, 2, 3])
    bm.mark_computed(1, [1, 2, 3], 3)
    bm.fork(1, 2)
    bm.allocate(3, [4, 4, 4])                            # 4 of 4 blocks used
    before = _snapshot(bm)
    assert not bm.can_allocate([1, 2, 3, 4])
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(4, [1, 2, 3, 4])
    assert not bm.can_append(2)                          # CoW needs a block
    with pytest.raises(NoFreeBlocksError):
        bm.append_slots(2, 4)
    with pytest.raises(NoFreeBlocksError):
        bm.append_slots(3, 5)
    assert _snapshot(bm) == before
    bm.check_invariants()


def test_disabled_prefix_caching_gives_no_hits():
    bm = BlockManager(16, 4, enable_prefix_caching=False)
    ids = list(range(20))
    bm.allocate(1, ids)
    bm.mark_computed(1, ids, 20)
    assert bm.num_cached_prefix_tokens(ids) == 0
    assert bm.allocate(2, ids) == 0
    bm.free(1)
    bm.free(2)
    stats = bm.stats()
    assert stats["num_cached_blocks"] == 0 and stats["prefix_hits"] == 0 and stats["hit_rate"] == 0.0
    bm.check_invariants()


def test_mark_computed_is_idempotent_and_dups_stay_unregistered():
    bm = BlockManager(16, 4)
    ids = list(range(10))
    bm.allocate(1, ids)
    bm.allocate(2, ids)                                  # nothing cached yet: a private copy
    bm.mark_computed(1, ids, 10)
    bm.mark_computed(1, ids, 10)
    bm.mark_computed(2, ids, 10)                         # same hashes: stays unregistered
    assert bm.stats()["num_cached_blocks"] == 2
    dup = bm.get_block_table(2)
    bm.free(2)
    bm.free(1)
    assert all(block in bm._free for block in dup)       # dups go straight to the free list
    with pytest.raises(ValueError, match="other tokens"):
        bm.allocate(3, ids)
        bm.mark_computed(3, [99] + ids[1:], 10)
    bm.check_invariants()


def test_hash_collisions_never_serve_wrong_tokens():
    bm = CollidingBlockManager(16, 2)
    a, b = [1, 2, 9], [2, 1, 9]                          # same bucket, different tokens
    bm.allocate(1, a)
    bm.mark_computed(1, a, 3)
    assert bm.num_cached_prefix_tokens(a) == 2
    assert bm.num_cached_prefix_tokens(b) == 0
    assert bm.allocate(2, b) == 0
    bm.check_invariants()


def test_unknown_seq_handling():
    bm = BlockManager(4, 2)
    bm.free(123)                                         # no-op
    assert not bm.has_seq(123)
    with pytest.raises(KeyError):
        bm.get_block_table(123)
    with pytest.raises(KeyError):
        bm.fork(123, 124)
    bm.allocate(1, [1])
    with pytest.raises(ValueError, match="already"):
        bm.fork(1, 1)
    bm.check_invariants()


# ---------------------------------------------------------------- state machine
# Prompts start with a cut of one of these, so prefixes collide often (tiny vocabulary).
_BASES = ([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1],
          [0, 1, 2, 0, 2, 2, 1, 1, 0, 0, 2, 1, 0, 2, 1, 1, 2, 0, 0, 2],
          [1, 1, 1, 1, 0, 0, 0, 0, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0])


@dataclass
class _Seq:
    tokens: list[int]
    num_computed: int
    num_slots: int


class BlockManagerMachine(RuleBasedStateMachine):
    """Drives the manager like a scheduler + backend, with a shadow of the KV cache contents."""

    @initialize(num_blocks=st.integers(1, 12), block_size=st.integers(1, 4),
                caching=st.sampled_from([True, True, True, False]), colliding=st.booleans())
    def setup(self, num_blocks, block_size, caching, colliding):
        cls = CollidingBlockManager if colliding else BlockManager
        self.bm = cls(num_blocks, block_size, caching)
        self.real_hash = not colliding
        self.bs = block_size
        self.shadow = {b: [None] * block_size for b in range(num_blocks)}   # block -> tokens written
        self.seqs: dict[int, _Seq] = {}
        self.next_id = 0

    def _pick(self, index):
        return sorted(self.seqs)[index % len(self.seqs)]

    @rule(base=st.sampled_from(_BASES), cut=st.integers(0, 14),
          suffix=st.lists(st.integers(0, 2), max_size=3), chunk=st.integers(1, 20), whole=st.booleans())
    def add_seq(self, base, cut, suffix, chunk, whole):
        prompt = base[:cut] + suffix or [0]
        cached = self.bm.num_cached_prefix_tokens(prompt)
        assert cached % self.bs == 0 and cached <= (len(prompt) - 1) // self.bs * self.bs
        num_tokens = len(prompt) if whole else min(len(prompt), cached + chunk)
        seq_id, self.next_id = self.next_id, self.next_id + 1
        num_blocks = -(-max(num_tokens, cached) // self.bs)
        if num_blocks <= self.bm.num_free_blocks:            # fits even if every hit is revived
            assert self.bm.can_allocate(prompt, num_tokens)
        if not self.bm.can_allocate(prompt, num_tokens):
            before = _snapshot(self.bm)
            with pytest.raises(NoFreeBlocksError):
                self.bm.allocate(seq_id, prompt, num_tokens)
            assert _snapshot(self.bm) == before
            if self.seqs:                                     # as a scheduler would: make room
                self.free(0)
            return
        num_free = self.bm.num_free_blocks
        in_use = {b for i in self.seqs for b in self.bm.get_block_table(i)}
        assert self.bm.allocate(seq_id, prompt, num_tokens) == cached
        self.seqs[seq_id] = _Seq(list(prompt), cached, max(num_tokens, cached))
        table = self.bm.get_block_table(seq_id)
        revived = sum(1 for b in table[:cached // self.bs] if b not in in_use)
        consumed = len(table) - cached // self.bs + revived   # hits in use cost nothing
        assert num_free - self.bm.num_free_blocks == consumed <= num_free

    @precondition(lambda self: self.seqs)
    @rule(index=st.integers(0, 99), k=st.integers(1, 12),
          sampled=st.lists(st.integers(0, 2), min_size=1, max_size=3))
    def step(self, index, k, sampled):
        """One forward for a seq: reserve slots (CoW), write KV in the shadow, mark computed."""
        seq_id = self._pick(index)
        seq = self.seqs[seq_id]
        if seq.num_computed == len(seq.tokens):
            seq.tokens += sampled
        target = min(len(seq.tokens), seq.num_computed + k)
        if not self._reserve(seq_id, seq, target):
            return
        table = self.bm.get_block_table(seq_id)
        for pos in range(seq.num_computed, target):
            block = table[pos // self.bs]
            owners = sum(t.count(block) for t in map(self.bm.get_block_table, self.seqs))
            assert owners == 1, f"write into block {block} shared by {owners} seqs"
            self.shadow[block][pos % self.bs] = seq.tokens[pos]
        seq.num_computed = target
        self.bm.mark_computed(seq_id, seq.tokens, target)
        if self.real_hash and self.bm.enable_prefix_caching:
            blocks = min(target // self.bs, (len(seq.tokens) - 1) // self.bs)
            assert self.bm.num_cached_prefix_tokens(seq.tokens) >= blocks * self.bs

    def _reserve(self, seq_id, seq, target):
        if target <= seq.num_slots:
            assert self.bm.append_slots(seq_id, target) == []
            return True
        fits = self.bm.can_append(seq_id, target - seq.num_slots)
        if not fits:
            before = _snapshot(self.bm)
            with pytest.raises(NoFreeBlocksError):
                self.bm.append_slots(seq_id, target)
            assert _snapshot(self.bm) == before
            return False
        old = self.bm.get_block_table(seq_id)
        copies = self.bm.append_slots(seq_id, target)
        new = self.bm.get_block_table(seq_id)
        assert len(copies) <= 1
        for src, dst in copies:
            index = old.index(src)
            assert new[index] == dst and dst not in old
            self.shadow[dst] = list(self.shadow[src])         # the backend's copy
        assert [b for b in new[:len(old)] if b not in old] == [d for _, d in copies]
        seq.num_slots = target
        return True

    @precondition(lambda self: self.seqs)
    @rule(index=st.integers(0, 99), fraction=st.floats(0, 1))
    def remark(self, index, fraction):
        seq_id = self._pick(index)
        seq = self.seqs[seq_id]
        self.bm.mark_computed(seq_id, seq.tokens, int(seq.num_computed * fraction))

    @precondition(lambda self: any(s.num_computed == s.num_slots for s in self.seqs.values()))
    @rule(index=st.integers(0, 99), sampled=st.lists(st.integers(0, 2), min_size=1, max_size=3),
          diverge=st.booleans())
    def fork(self, index, sampled, diverge):
        """Fork a caught-up seq (as beam search does after a step); maybe decode the child at once."""
        ready = sorted(i for i, s in self.seqs.items() if s.num_computed == s.num_slots)
        parent_id = ready[index % len(ready)]
        child_id, self.next_id = self.next_id, self.next_id + 1
        self.bm.fork(parent_id, child_id)
        parent = self.seqs[parent_id]
        self.seqs[child_id] = _Seq(list(parent.tokens), parent.num_computed, parent.num_slots)
        if diverge:
            self.step(sorted(self.seqs).index(child_id), len(sampled), sampled)

    @precondition(lambda self: self.seqs)
    @rule(index=st.integers(0, 99))
    def free(self, index):
        seq_id = self._pick(index)
        self.bm.free(seq_id)
        del self.seqs[seq_id]
        assert not self.bm.has_seq(seq_id)

    @precondition(lambda self: len(self.seqs) > 2)
    @rule()
    def free_oldest(self):
        """Keep the pool turning over so freed prefixes are revived and evicted."""
        self.free(0)

    @rule()
    def free_unknown(self):
        before = _snapshot(self.bm)
        self.bm.free(10**9)
        assert _snapshot(self.bm) == before

    @rule()
    def reset_cache(self):
        self.bm.reset_prefix_cache()
        assert self.bm.stats()["num_cached_blocks"] == 0

    @invariant()
    def books_balance(self):
        if not hasattr(self, "bm"):
            return
        self.bm.check_invariants()
        assert self.bm.num_used_blocks + self.bm.num_free_blocks == self.bm.num_blocks
        for seq_id, seq in self.seqs.items():
            table = self.bm.get_block_table(seq_id)
            assert len(table) == -(-seq.num_slots // self.bs)
            for pos in range(seq.num_computed):               # cached or written: the right tokens
                assert self.shadow[table[pos // self.bs]][pos % self.bs] == seq.tokens[pos]

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for seq_id in list(self.seqs):
            self.bm.free(seq_id)
        self.bm.check_invariants()
        assert self.bm.num_used_blocks == 0 and self.bm.num_free_blocks == self.bm.num_blocks


BlockManagerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=50,
                                                 deadline=None)
TestBlockManagerMachine = BlockManagerMachine.TestCase
