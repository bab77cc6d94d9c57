"""Beam search over forked sequences, HF-compatible, recording every candidate as a tree node.

The selection rules follow transformers' `_beam_search` (2W candidates per step, only the top W may
finish, a finished score is logprob_sum / generated_len ** length_penalty, the same early-stop
heuristic), so our best beam equals `generate(num_beams=W, do_sample=False)` on the same weights.
This module is pure bookkeeping: the engine forks and frees the sequences it names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

KEPT, PRUNED, FINISHED = "kept", "pruned", "finished"


@dataclass(frozen=True)
class BeamParams:
    """Beam width, length penalty, early stopping, max_tokens, how many candidates to return."""

    beam_width: int = 4
    max_tokens: int = 32
    length_penalty: float = 1.0
    early_stopping: bool | str = True      # True, False, or "never" (as in transformers)
    num_return: int | None = None          # default: beam_width
    stop_token_ids: tuple[int, ...] = ()   # in addition to the model's end-of-sequence tokens

    def __post_init__(self) -> None:
        for name, value, high in (("beam_width", self.beam_width, 16), ("max_tokens", self.max_tokens, 4096)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                raise ValueError(f"{name} must be an integer in [1, {high}], got {value!r}")
        lp = self.length_penalty
        if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp):
            raise ValueError(f"length_penalty must be a finite number, got {lp!r}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}")
        n = self.num_return if self.num_return is not None else self.beam_width
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.beam_width:
            raise ValueError(f"num_return must be an integer in [1, beam_width], got {self.num_return!r}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))


@dataclass
class BeamNode:
    """One candidate continuation: a token appended to its parent node's beam."""

    id: int
    parent: int | None
    token_id: int | None
    text: str
    logprob: float
    score: float          # cumulative logprob of the beam ending here
    status: str
    step: int

    def as_dict(self) -> dict:
        return {"id": self.id, "parent": self.parent, "token_id": self.token_id, "text": self.text,
                "logprob": self.logprob, "score": self.score, "status": self.status, "step": self.step}


@dataclass
class Hypothesis:
    """A finished beam: its tokens (the stop token included), raw and length-normalized scores."""

    token_ids: list[int]
    logprob_sum: float
    score: float
    node_id: int


@dataclass
class BeamChoice:
    """A surviving beam for the next step: which running beam it extends and with which token."""

    parent_index: int
    token_id: int
    score: float
    node_id: int


@dataclass
class BeamStep:
    kept: list[BeamChoice]
    new_nodes: list[BeamNode]
    dropped_nodes: list[int]          # kept nodes of the last step that no candidate extends
    done: bool


@dataclass
class BeamSearch:
    params: BeamParams
    eos_token_ids: tuple[int, ...]
    token_text: object = None          # callable id -> display text, or None
    nodes: list[BeamNode] = field(default_factory=list)
    finished: list[Hypothesis] = field(default_factory=list)
    scores: list[float] = field(default_factory=lambda: [0.0])       # running beams' cumulative logprobs
    node_ids: list[int] = field(default_factory=lambda: [0])         # running beams' last nodes
    histories: list[list[int]] = field(default_factory=lambda: [[]])  # running beams' generated tokens
    num_generated: int = 0
    improvable: bool = True
    done: bool = False

    def __post_init__(self) -> None:
        self.stop_ids = set(self.eos_token_ids) | set(self.params.stop_token_ids)
        self.nodes.append(BeamNode(0, None, None, "", 0.0, 0.0, KEPT, 0))

    def step(self, logprobs: torch.Tensor) -> BeamStep:
        """logprobs [num_running, vocab] (log_softmax of each running beam's logits) -> the next beams."""
        p, width = self.params, self.params.beam_width
        assert logprobs.shape[0] == len(self.scores)
        total = logprobs.float() + torch.tensor(self.scores)[:, None]
        vocab = total.shape[1]
        num_cand = min(2 * width, total.numel())
        cand_scores, flat = torch.topk(total.reshape(-1), num_cand)
        parents, tokens = (flat // vocab).tolist(), (flat % vocab).tolist()
        cand_scores = cand_scores.tolist()
        at_max = self.num_generated + 1 >= p.max_tokens
        hits = [at_max or t in self.stop_ids for t in tokens]
        # Finishing: only the top `width` candidates may finish, while the search can still improve.
        gen_len = self.num_generated + 1
        accepting = self.improvable and not (p.early_stopping is True and len(self.finished) >= width)
        finished_now = set()
        for k in range(min(width, num_cand)):
            if hits[k] and accepting:
                finished_now.add(k)
        # Running: the best `width` candidates that did not hit a stop.
        running = [k for k in range(num_cand) if not hits[k]][:width]
        new_nodes = []
        for k in range(num_cand):
            status = FINISHED if k in finished_now else KEPT if k in running else PRUNED
            text = self.token_text(tokens[k]) if self.token_text else ""
            node = BeamNode(len(self.nodes), self.node_ids[parents[k]], tokens[k], text,
                            float(logprobs[parents[k], tokens[k]]), cand_scores[k], status, gen_len)
            self.nodes.append(node)
            new_nodes.append(node)
        for k in sorted(finished_now):
            ids = self.histories[parents[k]] + [tokens[k]]
            self._add_finished(Hypothesis(ids, cand_scores[k], cand_scores[k] / gen_len ** p.length_penalty,
                                          new_nodes[k].id))
        kept = [BeamChoice(parents[k], tokens[k], cand_scores[k], new_nodes[k].id) for k in running]
        extended = {self.node_ids[c.parent_index] for c in kept} | {self.node_ids[parents[k]] for k in finished_now}
        dropped = [n for n in self.node_ids if n not in extended]
        self.histories = [self.histories[c.parent_index] + [c.token_id] for c in kept]
        self.scores = [c.score for c in kept]
        self.node_ids = [c.node_id for c in kept]
        self.num_generated = gen_len
        self._update_done(all(hits), kept)
        return BeamStep(kept, new_nodes, dropped, self.done)

    def _add_finished(self, hyp: Hypothesis) -> None:
        self.finished.append(hyp)
        self.finished.sort(key=lambda h: h.score, reverse=True)
        for dropped in self.finished[self.params.beam_width:]:
            self.nodes[dropped.node_id].status = PRUNED
        del self.finished[self.params.beam_width:]

    def _update_done(self, all_hit: bool, kept: list[BeamChoice]) -> None:
        p, width = self.params, self.params.beam_width
        full = len(self.finished) >= width
        if full and kept:
            length = p.max_tokens if (p.early_stopping == "never" and p.length_penalty > 0) else self.num_generated
            best_possible = kept[0].score / length ** p.length_penalty
            self.improvable = self.improvable and best_possible > min(h.score for h in self.finished)
        self.done = all_hit or not kept or not self.improvable or (p.early_stopping is True and full)

    def results(self) -> list[Hypothesis]:
        """The finished hypotheses, best first, at most num_return of them."""
        n = self.params.num_return or self.params.beam_width
        return self.finished[:n]
