"""Continuous batching: decodes first, then prefill chunks, within the token and sequence budgets.

When blocks run out the newest running sequence is preempted (its blocks freed, recomputed later).
The scheduler knows sequences and block ids; it never touches tensors.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager, NoFreeBlocksError
from engine.config import EngineConfig
from engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    wants_logits: bool = False      # this chunk reaches the last token, so a next token is sampled

    def __post_init__(self) -> None:
        self.wants_logits = self.seq.num_computed + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)   # copy-on-write block pairs
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Owns the waiting and running queues and asks the block manager for room."""

    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ---- queues ------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Take a sequence out of the queues and give its blocks back."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.seq_id)

    # ---- one step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_batched_tokens
        # 1. Running sequences, oldest first: decodes and unfinished prefill chunks.
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq not in self.running or seq.num_uncomputed == 0:
                continue                    # preempted this step, or a beam waiting for its siblings
            num_new = min(seq.num_uncomputed, budget)
            if self._grow(seq, num_new, out):
                out.scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new
        # 2. Waiting sequences in arrival order (preempted ones were put in front).
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            cached = self.blocks.num_cached_prefix_tokens(seq.token_ids)
            num_new = min(seq.num_tokens - cached, budget)
            if not self.blocks.can_allocate(seq.token_ids, cached + num_new):
                break
            seq.num_computed = self.blocks.allocate(seq.seq_id, seq.token_ids, cached + num_new)
            seq.num_cached_prefix = seq.num_computed
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return out

    def add_running(self, seq: Sequence, after: Sequence) -> None:
        """Put a forked sequence (its blocks already shared by the block manager) right after its parent."""
        seq.status = SequenceStatus.RUNNING
        self.running.insert(self.running.index(after) + 1, seq)

    def _grow(self, seq: Sequence, num_new: int, out: SchedulerOutput) -> bool:
        """Make room for seq's next num_new slots, preempting the newest others; False if seq went."""
        while True:
            try:
                out.copies += self.blocks.append_slots(seq.seq_id, seq.num_computed + num_new)
                return True
            except NoFreeBlocksError:
                victims = self._victims()
                for victim in victims:
                    self._preempt(victim, out)
                if seq in victims:
                    return False

    def _victims(self) -> list[Sequence]:
        """The newest running sequence, with its whole beam group (beams advance in lockstep)."""
        newest = self.running[-1]
        if newest.group is None:
            return [newest]
        return [s for s in reversed(self.running) if s.group is newest.group]

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.status = SequenceStatus.PREEMPTED
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        out.scheduled = [s for s in out.scheduled if s.seq is not seq]

    def mark_computed(self, out: SchedulerOutput) -> None:
        """After the forward: the scheduled tokens' KV is in the cache."""
        size = self.blocks.block_size
        for item in out.scheduled:
            seq = item.seq
            before = seq.num_computed
            seq.num_computed += item.num_new_tokens
            if seq.num_computed // size != before // size:     # a block just filled up: cache it
                self.blocks.mark_computed(seq.seq_id, seq.token_ids, seq.num_computed)
