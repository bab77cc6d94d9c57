"""Pipelined decode for backends that run asynchronously to the host (CUDA).

A step of decodes (greedy or sampled, penalised or not, with logprobs or not) leaves its tokens on the
device -- the argmax, or Sampler.tokens' draw with each request's own uniform, penalties counting the
tokens still in flight; asked-for logprobs beside them -- (an InflightStep); the engine's next step()
launches the following step with those device tokens as its inputs, and only then reads them on the host
and publishes them, so the scheduler, block manager and request bookkeeping run while the GPU computes.
A sequence that finished in the step being read has one extra row in the step already launched; that
row is dropped (its blocks are freed at once: later GPU work is stream-ordered after it). Blocks a step
launched ahead filled are hashed for the prefix cache once their tokens are known. Engine mixes this in.
"""
from __future__ import annotations

import time

import torch

from engine.batch import Batch
from engine.block_manager import NoFreeBlocksError
from engine.request import Request
from engine.sampler import Logprobs, download, logprob_rows, sample_results
from engine.sequence import Sequence, SequenceStatus


class InflightStep:
    """A launched decode step whose sampled tokens (and asked-for logprobs) the host has not read yet."""

    __slots__ = ("rows", "tokens", "host", "landed", "logprobs")

    def __init__(self, rows: list[Sequence], tokens: torch.Tensor, host: torch.Tensor, landed,
                 logprobs: Logprobs | None = None) -> None:
        self.rows, self.tokens, self.host, self.landed, self.logprobs = rows, tokens, host, landed, logprobs


class PipelinedDecode:
    """Engine's pipelining steps; they use its backend, blocks, scheduler, model, requests and counters."""

    def _can_pipeline(self, rows: list[Sequence]) -> bool:
        """Every row a decode of a live request that can take one more token (past min_tokens: no EOS mask
        to apply), nothing waiting: the next step's inputs are then exactly this step's device tokens, in
        the same order."""
        if not getattr(self.backend, "supports_async", False) or self.scheduler.waiting or not rows:
            return False
        requests, limit = self._requests, self.max_model_len - 2
        for seq in rows:
            req = requests.get(seq.request_id)
            if not isinstance(req, Request) or seq.status is SequenceStatus.FINISHED \
                    or seq.num_computed != len(seq.prompt_ids) + len(seq.output_ids) or seq.num_computed > limit \
                    or (req.params.min_tokens and len(seq.output_ids) < req.params.min_tokens):
                return False
        return True

    def _device_tokens(self, rows: list[Sequence], logits: torch.Tensor,
                       pending: torch.Tensor | None = None) -> tuple:
        """InflightStep's fields after rows: (the rows' tokens on the device, their host copy in flight, an
        event that marks it landed, the asked-for logprobs' host copies in flight or None). pending: each
        row's token of the step in flight, not yet in its output_ids (penalties count it)."""
        params = [self._requests[seq.request_id].params for seq in rows]
        gens = [self._requests[seq.request_id].generator for seq in rows]
        tokens = self.sampler.tokens(logits, params, gens, [s.prompt_ids for s in rows],
                                     [s.output_ids for s in rows], pending)
        return self._to_host(tokens, logprob_rows(logits, tokens, params))

    @staticmethod
    def _to_host(tokens: torch.Tensor, logprobs: Logprobs | None = None) -> tuple:
        """(tokens, their host copy in flight, an event that marks it (and the logprobs') landed, the
        logprobs' host copies)."""
        if not tokens.is_cuda:
            return tokens, tokens, None, logprobs
        host = download(tokens)
        logprobs = logprobs.to_host() if logprobs is not None else None
        landed = torch.cuda.Event()
        landed.record()
        return tokens, host, landed, logprobs

    def _launch_ahead(self, prev: "InflightStep") -> "InflightStep | None":
        """The step after prev, its inputs prev's device tokens; None when it cannot run blind."""
        keep = [i for i, seq in enumerate(prev.rows) if not seq.is_finished]
        rows = [prev.rows[i] for i in keep]
        if not self._can_pipeline(rows):
            return None
        try:
            for seq in rows:                       # the slot of the token being computed
                self.blocks.append_slots(seq.seq_id, seq.num_computed + 1)
        except NoFreeBlocksError:
            return None                            # the normal path preempts
        batch = Batch.build([([0], seq.num_computed, self.blocks.get_block_table(seq.seq_id)) for seq in rows],
                            self.block_size, [True] * len(rows))
        ids = prev.tokens if len(keep) == len(prev.rows) else \
            prev.tokens[torch.tensor(keep, device=prev.tokens.device)]
        batch.device_input_ids = ids
        reqs = [self._requests[seq.request_id] for seq in rows]
        tokens = None
        if all(r.plain_greedy for r in reqs):            # one graph replay, the argmax inside
            tokens = self.model.forward_tokens(batch)
        elif all(r.plain for r in reqs):                 # one graph replay, the sampling kernel inside
            tokens = self.model.sample_step(batch, [r.params for r in reqs], [r.generator for r in reqs])
        launched = self._to_host(tokens) if tokens is not None else \
            self._device_tokens(rows, self.model.forward(batch), pending=ids)
        for seq in rows:
            seq.num_computed += 1
        self.counters["steps"] += 1
        self.counters["steps_ahead"] += 1
        return InflightStep(rows, *launched)

    def _read_inflight(self, step: "InflightStep") -> None:
        """Wait for a pipelined step's tokens on the host and publish them."""
        if step.landed is not None:
            step.landed.synchronize()
        now = time.monotonic()
        params = [self._requests[seq.request_id].params if not seq.is_finished else None for seq in step.rows]
        for seq, res in zip(step.rows, sample_results(step.host.tolist(), step.logprobs, params)):
            if not seq.is_finished:                # (finished in an earlier step: an extra row)
                self._publish(self._requests[seq.request_id], res, now)

    def _mark_ahead(self, step: "InflightStep") -> None:
        """Cache the blocks a pipelined step filled, now that the tokens in them are known."""
        size = self.block_size
        for seq in step.rows:
            if not seq.is_finished and seq.num_computed % size == 0:
                self.blocks.mark_computed(seq.seq_id, seq.token_ids, seq.num_computed)
