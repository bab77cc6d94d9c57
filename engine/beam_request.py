"""A beam request inside the engine: its live sequences, the search, and the events it publishes."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.beam import BeamParams, BeamSearch, BeamStep
from engine.request import RequestHandle, RequestOutput
from engine.sequence import FinishReason, SamplingParams, Sequence


@dataclass
class BeamRequest:
    """Engine-side state of one beam search: W sequences advancing in lockstep."""

    request_id: str
    params: BeamParams
    search: BeamSearch
    seqs: list[Sequence]                 # running beams, in the search's order
    handle: RequestHandle
    tokenizer: object | None
    prompt_ids: list[int] = field(default_factory=list)
    pending: dict[int, torch.Tensor] = field(default_factory=dict)   # seq_id -> logprobs row
    peak_blocks: int = 0
    first_token_time: float | None = None

    def collect(self, seq: Sequence, logits_row: torch.Tensor) -> bool:
        """Keep one beam's logprobs; True once every live beam has delivered its row."""
        self.pending[seq.seq_id] = logits_row.float().log_softmax(-1).cpu()
        return all(s.seq_id in self.pending for s in self.seqs)

    def take_rows(self) -> torch.Tensor:
        rows = torch.stack([self.pending[s.seq_id] for s in self.seqs])   # [num_beams, vocab]
        self.pending.clear()
        return rows

    def step_output(self, step: BeamStep) -> RequestOutput:
        """A streamed event: the new tree nodes and the nodes no candidate extends any more."""
        return RequestOutput(self.request_id, "", [], num_prompt_tokens=len(self.prompt_ids),
                             num_generated_tokens=self.search.num_generated,
                             beam_nodes=[n.as_dict() for n in step.new_nodes],
                             beam_dropped=step.dropped_nodes)

    def final_output(self, reason: FinishReason) -> RequestOutput:
        """The last event: the finished candidates best first (text, tokens, scores) and the whole tree."""
        cands = []
        for hyp in self.search.results():
            ids = [t for t in hyp.token_ids if t not in self.search.stop_ids]
            text = self.tokenizer.decode(ids) if self.tokenizer is not None else ""
            cands.append({"text": text, "token_ids": hyp.token_ids, "score": hyp.score,
                          "lm_score": hyp.score, "logprob_sum": hyp.logprob_sum,
                          "num_tokens": len(hyp.token_ids), "node_id": hyp.node_id})
        best = cands[0] if cands else {"text": "", "token_ids": []}
        return RequestOutput(self.request_id, best["text"], list(best["token_ids"]), True,
                             reason.value if reason != FinishReason.STOP else "stop",
                             len(self.prompt_ids), self.search.num_generated,
                             beams=cands, beam_tree=[n.as_dict() for n in self.search.nodes],
                             peak_blocks=self.peak_blocks)


def fork_children(parent: Sequence, count: int, new_id) -> list[Sequence]:
    """count-1 new sequences copying parent's tokens (their blocks are shared by the caller)."""
    return [Sequence(new_id(), parent.request_id, parent.prompt_ids, parent.params,
                     output_ids=list(parent.output_ids), status=parent.status, num_computed=parent.num_computed,
                     num_cached_prefix=parent.num_cached_prefix, arrival_time=parent.arrival_time,
                     first_token_time=parent.first_token_time, group=parent.group)
            for _ in range(count - 1)]


def beam_sampling_params(params: BeamParams) -> SamplingParams:
    """The SamplingParams a beam's sequences carry (used only for limits; beams pick their own tokens)."""
    return SamplingParams(max_tokens=params.max_tokens, temperature=0.0, ignore_eos=True)
