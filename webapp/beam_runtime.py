"""Beam search at the web edge: admit and submit, stream the steps, then rerank and export.

The reranker (MiniLM) runs on the request's thread, never the engine's; the Runtime holds the one
instance. Every finished beam search with candidates appends a record to the JSONL export file
(app config BEAM_EXPORT_PATH); its id goes out with beam_done so the page can record the user's pick.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Iterator

from webapp.beam_schema import BeamSpec, beam_done_event, beam_step_event
from webapp.runtime import Generation, Runtime
from webapp.schema import ApiError

log = logging.getLogger("pagedecode.webapp")


@dataclass
class BeamResult:
    candidates: list[dict]      # reranked order (LM order when not reranked), each with features, rerank_score, index
    record_id: str | None       # the JSONL record, or None (aborted, no candidates, export failed)
    reranked: bool


class BeamGeneration(Generation):
    """An admitted beam search; each search step counts as one token for TTFT and inter-token latency."""

    def __init__(self, runtime: Runtime, handle, num_prompt_tokens: int, spec: BeamSpec, prompt_text: str):
        super().__init__(runtime, handle, num_prompt_tokens)
        self.spec, self.prompt_text = spec, prompt_text

    def _observe(self, out) -> None:
        if not out.beam_nodes and not (out.finished and out.beams):
            return
        now = time.monotonic()
        metrics = self.runtime.metrics
        if self.first_token_at is None:
            self.first_token_at = now
            metrics.ttft.observe(now - self.submitted)
        elif self.last_token_at is not None:
            metrics.itl.observe(now - self.last_token_at)
        self.last_token_at = now
        self.num_tokens += 1


def prompt_text(engine, spec: BeamSpec, prompt_ids: list[int]) -> str:
    """What the candidates answer, for the reranker's relevance and the export: the last user turn."""
    if spec.messages is not None:
        users = [m["content"] for m in spec.messages if m["role"] == "user"]
        return users[-1] if users else spec.messages[-1]["content"]
    if isinstance(spec.prompt, str):
        return spec.prompt
    if engine.tokenizer is not None:
        return engine.tokenizer.decode(prompt_ids)
    return " ".join(map(str, prompt_ids))


def start_beam(rt: Runtime, spec: BeamSpec) -> BeamGeneration:
    """Tokenize, admit (or 429) and submit one beam search; starts loading the reranker meanwhile."""
    engine = rt.engine
    ids = rt.prompt_ids(spec.prompt, spec.messages)
    rt.admission.acquire()
    submitted = time.monotonic()
    try:
        handle = engine.submit_beam(ids, spec.params)
    except BaseException as exc:
        rt.admission.release()
        if isinstance(exc, ValueError):
            raise ApiError(str(exc), param="prompt") from None
        raise
    if spec.rerank:
        rt.warm_reranker()
    gen = BeamGeneration(rt, handle, len(ids), spec, prompt_text(engine, spec, ids))
    gen.submitted = submitted  # the engine may run its first step before this object exists
    return gen


def finish(gen: BeamGeneration, out, export_path) -> BeamResult:
    """Rerank the finished candidates (unless asked not to) and append their record to the export."""
    cands = list(out.beams or [])
    plain = [{**c, "features": {}, "rerank_score": None, "index": i} for i, c in enumerate(cands)]
    if out.finish_reason == "abort" or not cands:
        return BeamResult(plain, None, False)
    ranked = None
    if gen.spec.rerank:
        try:
            ranked = gen.runtime.reranker().rank(gen.prompt_text, cands)
        except Exception:  # noqa: BLE001 - a missing encoder must not lose the search: LM order instead
            log.exception("reranking failed; candidates stay in LM order")
    try:
        from engine.rerank_data import append_jsonl
        record_id = append_jsonl(export_path, gen.prompt_text, ranked or plain)
    except (OSError, ValueError):
        log.exception("could not append the beam search to %s", export_path)
        record_id = None
    return BeamResult(ranked or plain, record_id, ranked is not None)


def beam_events(gen: BeamGeneration, export_path, poll_s: float | None = None) -> Iterator[dict | None]:
    """beam_step events, then beam_done; None after each quiet poll_s (a chance for a keep-alive)."""
    for out in gen.outputs(poll_s=poll_s):
        if out is None:
            yield None
        elif not out.finished:
            yield beam_step_event(out)
        else:
            out = _with_prompt_count(gen, out)
            yield beam_done_event(out, finish(gen, out, export_path), gen.timing())


def run_beam(gen: BeamGeneration, export_path) -> tuple:
    """Run to the end (for /generate): the final RequestOutput and its BeamResult."""
    for out in gen.outputs():
        if out.finished:
            out = _with_prompt_count(gen, out)
            return out, finish(gen, out, export_path)
    raise AssertionError("a beam search ended without a final output")


def _with_prompt_count(gen: BeamGeneration, out):
    # The engine's final beam output can count 0 prompt tokens (its beams are gone by then); we know it.
    return dataclasses.replace(out, num_prompt_tokens=gen.num_prompt_tokens)
