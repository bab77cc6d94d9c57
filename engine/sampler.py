"""Batched logits processing: penalties, temperature, top-k/top-p/min-p, seeded sampling, logprobs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sequence import SamplingParams


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None                         # of the chosen token (raw model distribution), when asked
    top_logprobs: list[tuple[int, float]] | None  # the n most likely tokens, when asked for


def make_generator(seed: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                    output_ids: list[int]) -> torch.Tensor:
    """Repetition (HF style, over prompt and output) then presence/frequency (OpenAI, output only)."""
    if params.repetition_penalty != 1.0 and (prompt_ids or output_ids):
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and output_ids:
        ids, counts = torch.tensor(output_ids, dtype=torch.long).unique(return_counts=True)
        logits[ids] -= params.presence_penalty + params.frequency_penalty * counts.to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks (masked entries become -inf)."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first one always stays).
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


class Sampler:
    """Picks one token per row. Each row's randomness comes only from its own generator."""

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], prompt_ids: list[list[int]],
                 output_ids: list[list[int]], generators: list[torch.Generator | None]) -> list[SampleResult]:
        # logits: [num_rows, vocab] float32, on the backend's device. Greedy rows without penalties
        # are decided there; only token ids (and asked-for logprobs) cross to the host.
        simple = all(p.is_greedy and p.repetition_penalty == 1.0 and not p.presence_penalty
                     and not p.frequency_penalty for p in params)
        if simple:
            chosen = logits.argmax(-1).tolist()
        else:
            logits = logits.cpu()
            chosen = [self._pick(logits[i].clone(), p, prompt_ids[i], output_ids[i], generators[i])
                      for i, p in enumerate(params)]
        # Logprobs (under the raw model distribution) only for the rows that asked for them.
        raw = logits.log_softmax(-1) if any(p.logprobs is not None for p in params) else None
        results = []
        for i, (token, p) in enumerate(zip(chosen, params)):
            if p.logprobs is None:
                results.append(SampleResult(token, None, None))
                continue
            vals, ids = raw[i].topk(p.logprobs) if p.logprobs else (raw[i, :0], raw[i, :0])
            results.append(SampleResult(token, float(raw[i, token]), list(zip(ids.tolist(), vals.tolist()))))
        return results

    @staticmethod
    def _pick(logits: torch.Tensor, p: SamplingParams, prompt_ids: list[int], output_ids: list[int],
              generator: torch.Generator | None) -> int:
        logits = apply_penalties(logits, p, prompt_ids, output_ids)
        if p.is_greedy:
            return int(logits.argmax())
        probs = filter_logits(logits, p).softmax(-1)
        return int(torch.multinomial(probs, 1, generator=generator))
