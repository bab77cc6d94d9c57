"""A request's state inside the engine, and the handle its caller iterates over."""
from __future__ import annotations

import queue
import random
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from engine.sampler import has_penalties
from engine.sequence import FinishReason, SamplingParams, Sequence


@dataclass
class RequestOutput:
    """One update of a request: the new text and tokens since the last one."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_cached_tokens: int = 0
    logprobs: list[dict] | None = None
    error: str | None = None
    time_to_first_token: float | None = None
    beam_nodes: list[dict] | None = None     # beam search: tree nodes created by this step
    beam_dropped: list[int] | None = None    # beam search: kept nodes that no candidate extends
    beams: list[dict] | None = None          # beam search, final output: finished candidates, best first
    beam_tree: list[dict] | None = None      # beam search, final output: every node
    peak_blocks: int | None = None           # beam search: most KV blocks the request held at once


@dataclass
class Completion:
    """A finished request, gathered from its outputs."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    num_prompt_tokens: int
    num_generated_tokens: int
    num_cached_tokens: int
    logprobs: list[dict] | None = None
    time_to_first_token: float | None = None
    beams: list[dict] | None = None
    beam_tree: list[dict] | None = None
    peak_blocks: int | None = None


class RequestError(RuntimeError):
    """The engine failed while running this request."""


class RequestHandle:
    """Iterate to receive RequestOutputs as they are produced; cancel() aborts the request."""

    def __init__(self, request_id: str, engine):
        self.request_id = request_id
        self._engine = engine
        self._queue: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        self.finished = False

    def put(self, output: RequestOutput) -> None:
        self._queue.put(output)

    def __iter__(self) -> Iterator[RequestOutput]:
        while not self.finished:
            out = self.get()
            yield out

    def get(self, timeout: float | None = None) -> RequestOutput:
        out = self._queue.get(timeout=timeout)
        if out.finished:
            self.finished = True
        if out.error:
            raise RequestError(out.error)
        return out

    def cancel(self) -> None:
        if not self.finished:
            self._engine.abort(self.request_id)

    def result(self, timeout: float | None = None) -> Completion:
        """Block until the request finishes and return everything it produced."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def outputs() -> Iterator[RequestOutput]:
            while not self.finished:
                yield self.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        return gather(self.request_id, outputs())


def gather(request_id: str, outputs: Iterable[RequestOutput]) -> Completion:
    """One Completion from a request's outputs, up to and including its final one."""
    texts, ids, logprobs, last = [], [], [], None
    for last in outputs:
        texts.append(last.text)
        ids += last.token_ids
        logprobs += last.logprobs or []
    assert last is not None, "a request ends with a final output"
    return Completion(request_id, "".join(texts), ids, last.finish_reason, last.num_prompt_tokens,
                      last.num_generated_tokens, last.num_cached_tokens, logprobs or None,
                      last.time_to_first_token, last.beams, last.beam_tree, last.peak_blocks)


@dataclass
class Request:
    """Engine-side state: the sequence, its detokenizer, stop handling and the handle to feed."""

    request_id: str
    seq: Sequence
    params: SamplingParams
    handle: RequestHandle
    detok: object | None
    generator: random.Random | None
    eos_token_ids: tuple[int, ...]
    text: str = ""
    num_emitted_chars: int = 0
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[dict] = field(default_factory=list)

    @property
    def plain_greedy(self) -> bool:
        """Greedy, unpenalised and without logprobs: the next token is the argmax alone (a graph that
        returns tokens, Backend.forward_tokens)."""
        return self.plain and self.params.is_greedy

    @property
    def plain(self) -> bool:
        """Unpenalised and without logprobs, greedy or sampled: the next token is the argmax or the fused
        draw alone, from the logits as they are (a graph that returns tokens, Backend.sample_step)."""
        p = self.params
        return p.logprobs is None and not has_penalties(p)

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.params.stop), default=0)

    def add_token(self, token_id: int) -> FinishReason | None:
        """Record a sampled token; return why the request finishes now, if it does."""
        seq, p = self.seq, self.params
        seq.output_ids.append(token_id)
        self.pending_ids.append(token_id)
        is_stop_token = token_id in p.stop_token_ids or (not p.ignore_eos and token_id in self.eos_token_ids)
        if self.detok is not None and not (is_stop_token and token_id in self.eos_token_ids):
            self.text += self.detok.add(token_id)
        if is_stop_token and len(seq.output_ids) > p.min_tokens - 1:
            return FinishReason.STOP
        if p.stop and self._cut_at_stop_string():
            return FinishReason.STOP
        if len(seq.output_ids) >= p.max_tokens:
            return FinishReason.LENGTH
        return None

    def _cut_at_stop_string(self) -> bool:
        start = max(0, self.num_emitted_chars - self.max_stop_len)
        hits = [i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

    def take_output(self, finish: FinishReason | None) -> RequestOutput | None:
        """The update since the last one; holds back text that may be the start of a stop string."""
        end = len(self.text)
        if finish is None and self.params.stop:
            end = max(self.num_emitted_chars, end - (self.max_stop_len - 1))
        if finish is None and end == self.num_emitted_chars and not self.pending_ids:
            return None
        delta = self.text[self.num_emitted_chars:end]
        self.num_emitted_chars = end
        seq = self.seq
        ttft = None if seq.first_token_time is None else seq.first_token_time - seq.arrival_time
        out = RequestOutput(self.request_id, delta, self.pending_ids, finish is not None,
                            finish.value if finish is not None else None, len(seq.prompt_ids),
                            len(seq.output_ids), seq.num_cached_prefix, self.pending_logprobs or None,
                            time_to_first_token=ttft)
        self.pending_ids, self.pending_logprobs = [], []
        return out
