"""Batched logits processing: penalties, temperature, top-k/top-p/min-p, seeded sampling, logprobs -- all
rows at once, on the logits' device."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import NamedTuple

import torch

from engine.sequence import SamplingParams


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None                         # of the chosen token (raw model distribution), when asked
    top_logprobs: list[tuple[int, float]] | None  # the n most likely tokens, when asked for


def make_generator(seed: int) -> random.Random:
    """A request's own random stream: one uniform a sampled token (uniform()). Python's generator, not a
    torch.Generator: a draw costs ~0.1 us instead of ~2.3 (128 rows a step: 0.3 ms of host time)."""
    return random.Random(seed)


def uniform(generator: random.Random | None) -> float:
    """A float32-exact uniform in [0, 1) (24 random bits, as torch.rand draws a float32) from the
    request's generator (None: Python's global one)."""
    return (generator or random).getrandbits(24) * 2.0 ** -24


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                    output_ids: list[int]) -> torch.Tensor:
    """Repetition (HF style, over prompt and output) then presence/frequency (OpenAI, output only), in
    place on one row [vocab] on any device. A token seen twice is read twice before either write, so it
    is penalised once."""
    if params.repetition_penalty != 1.0 and (prompt_ids or output_ids):
        seen = torch.tensor(prompt_ids + output_ids, dtype=torch.long).to(logits.device, non_blocking=True)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and output_ids:
        ids, counts = torch.tensor(output_ids, dtype=torch.long).unique(return_counts=True)
        ids, counts = ids.to(logits.device, non_blocking=True), counts.to(logits.device, non_blocking=True)
        logits[ids] -= params.presence_penalty + params.frequency_penalty * counts.to(logits.dtype)
    return logits


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor to device without waiting for the device's queue, through pinned memory taken
    from torch's pinned allocator (Tensor.pin_memory() first asks whether t is pinned: ~0.3 ms a call under
    the profiler on the H200's host)."""
    if device.type == "cpu":
        return t
    pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    pinned.copy_(t)
    return pinned.to(device, non_blocking=True)


def download(t: torch.Tensor) -> torch.Tensor:
    """A device tensor's host copy in pinned memory, in flight (non_blocking: valid once the device has
    passed this point; an event recorded after it says when)."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


def log_min_p(p: SamplingParams) -> float:
    """log(min_p), -inf without the filter (x >= max + log(min_p) keeps a token)."""
    return math.log(p.min_p) if p.min_p > 0.0 else float("-inf")


def penalise_rows(logits: torch.Tensor, rows: list[int], params: list[SamplingParams], prompt_ids: list[list[int]],
                  output_ids: list[list[int]], pending: torch.Tensor | None = None) -> None:
    """apply_penalties on logits[rows] in place, all rows at once: the seen tokens as one mask and the
    output counts as one scatter, from one upload of their ids (the same float32 arithmetic as the one-row
    form, so the same logits). pending: int64 [len(params)] on the logits' device, a token each row has
    generated that output_ids does not hold yet (the pipelined decode's step in flight), counted as if it
    were appended."""
    dev = logits.device
    r, vocab = len(rows), logits.shape[1]
    more = pending is not None
    rep = [j for j, i in enumerate(rows)
           if params[i].repetition_penalty != 1.0 and (prompt_ids[i] or output_ids[i] or more)]
    cnt = [j for j, i in enumerate(rows)
           if (params[i].presence_penalty or params[i].frequency_penalty) and (output_ids[i] or more)]
    if not rep and not cnt:
        return
    seen = [prompt_ids[rows[j]] + output_ids[rows[j]] for j in rep]
    said = [output_ids[rows[j]] for j in cnt]
    parts = [[t for ids in seen for t in ids], [j for j, ids in zip(rep, seen) for _ in ids],
             [t for ids in said for t in ids], [j for j, ids in zip(cnt, said) for _ in ids], rows, rep, cnt]
    packed = upload(torch.tensor([v for part in parts for v in part], dtype=torch.long), dev)    # one copy
    seen_ids, seen_row, said_ids, said_row, idx, rep_t, cnt_t = packed.split([len(part) for part in parts])
    if more:                                   # one more (row, token) pair a row: its pending token
        pend = pending[idx].long()
        seen_ids, seen_row = torch.cat([seen_ids, pend[rep_t]]), torch.cat([seen_row, rep_t])
        said_ids, said_row = torch.cat([said_ids, pend[cnt_t]]), torch.cat([said_row, cnt_t])
    factors = torch.tensor([[params[i].repetition_penalty for i in rows], [params[i].presence_penalty for i in rows],
                            [params[i].frequency_penalty for i in rows]], dtype=torch.float32)
    rp, pres, freq = upload(factors, dev)
    x = logits[idx]
    if rep:
        mask = torch.zeros(r, vocab, dtype=torch.bool, device=dev)
        mask[seen_row, seen_ids] = True
        x = torch.where(mask, torch.where(x > 0, x / rp[:, None], x * rp[:, None]), x)
    if cnt:
        counts = torch.zeros(r, vocab, dtype=x.dtype, device=dev)
        counts.index_put_((said_row, said_ids), torch.ones((), dtype=x.dtype, device=dev).expand(len(said_ids)),
                          accumulate=True)
        x = x - ((counts > 0) * pres[:, None] + freq[:, None] * counts)
    logits[idx] = x


def sorts_whole_rows(device: torch.device) -> bool:
    """Whether top-p rows are sorted whole (filter_rows): on a GPU."""
    return device.type != "cpu"


def has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)


def is_ranked(p: SamplingParams, vocab: int) -> bool:
    """Whether a row's candidates are the most likely tokens in descending order (top-k or top-p
    filters it), as against the whole vocabulary, or min-p's survivors, in token-id order."""
    return bool(p.top_k and p.top_k < vocab) or p.top_p < 1.0


class Filtered(NamedTuple):
    """filter_rows' result. The candidates of row i are values[i][keep[i]] (all of them when keep is None),
    their token ids ids[i][keep[i]] (the positions when ids is None), in the order the inverse CDF walks
    them; for ranked rows always a prefix of the row."""
    values: torch.Tensor            # [n, w] float32: the scaled logits
    ids: torch.Tensor | None        # [n, w] int64
    keep: torch.Tensor | None       # [n, w] bool
    cum: torch.Tensor | None        # ranked rows: [n, w] float64 running sum of exp(value - row max), 0 past top_k


def filter_rows(logits: torch.Tensor, params: list[SamplingParams]) -> Filtered:
    """Temperature, then the top-k, top-p and min-p filters of rows [n, vocab] (float32, any device), all
    rows at once.

    Rows that top-k or top-p filter (is_ranked; all of them or none) come back as their m most likely
    tokens in descending order, with top-p's mass normalised over the whole top-k-filtered row, in float64
    (the running sum the inverse CDF then walks). On the CPU m doubles from 64 (the largest top_k at least)
    until every row's nucleus ends inside them -- the first token whose preceding mass reaches top_p is
    outside it -- so no row sorts the vocabulary (3 ms a row at 49k tokens). On a GPU top-p rows are sorted
    whole: torch's row sort costs less there than the host round trip each doubling would take (0.1 ms for
    one 49k row, 0.7 for 128 on the H200), and nothing in this function waits for the device (the
    pipelined decode launches the next step before reading these tokens).
    The others come back whole, in token-id order, min-p's filter as the mask."""
    n, vocab = logits.shape
    dev = logits.device
    ranked = [is_ranked(p, vocab) for p in params]
    if any(ranked) and not all(ranked):
        raise ValueError("filter_rows: rows must be all ranked or all unranked")
    top_k = [p.top_k if p.top_k and p.top_k < vocab else vocab for p in params]
    host = torch.tensor([[p.temperature for p in params], top_k, [p.top_p for p in params],
                         [log_min_p(p) for p in params]], dtype=torch.float64)
    temperature, k, top_p, floor = upload(host, dev)
    logits = logits / temperature.float()[:, None]
    floor = floor.float()[:, None]
    if not ranked[0]:
        if not any(p.min_p > 0.0 for p in params):
            return Filtered(logits, None, None, None)
        return Filtered(logits, None, logits >= logits.amax(-1, keepdim=True) + floor, None)
    k = k.long()[:, None]
    any_p = any(p.top_p < 1.0 for p in params)
    m = min(vocab, max(max((kk for kk in top_k if kk < vocab), default=0), 64 if any_p else 0))
    if any_p and sorts_whole_rows(dev):
        m = vocab
    whole = None
    while True:
        vals, ids = logits.topk(m, -1) if m < vocab else logits.sort(-1, descending=True)
        inside = torch.arange(m, device=dev)[None] < k
        e = (vals.double() - vals[:, :1].double()).exp()            # the row's maximum comes first
        if min(top_k) < m:
            e = e.masked_fill(~inside, 0.0)
        cum = e.cumsum(-1)
        keep = inside
        if any_p:
            total = cum[:, -1]
            if m < vocab:                      # a row without top_k normalises over all of it
                if whole is None:
                    whole = (logits.double() - vals[:, :1].double()).exp().sum(-1)
                total = torch.where(k[:, 0] < vocab, total, whole)
            keep = inside & ((cum - e) < top_p[:, None] * total[:, None])   # the first token always stays
            if m < vocab and not bool((~keep[:, -1] | (k[:, 0] <= m)).all()):
                m = min(2 * m, vocab)
                continue
        break
    keep &= vals >= vals[:, :1] + floor
    return Filtered(vals, ids, keep, cum)


def by_group(logits: torch.Tensor, groups) -> torch.Tensor:
    """int64 [n] on the logits' device, one token a row, from groups of rows that are decided alike:
    (row indices, pick(group's logits, row indices, their index tensor or None)). A group of every row gets
    the logits as they are; the others a gathered copy, their tokens scattered back."""
    n = logits.shape[0]
    for rows, pick in groups:
        if len(rows) == n:
            return pick(logits, rows, None)
    out = torch.empty(n, dtype=torch.long, device=logits.device)
    for rows, pick in groups:
        if rows:
            idx = upload(torch.tensor(rows), logits.device)
            out[idx] = pick(logits[idx], rows, idx).long()
    return out


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[random.Random | None]) -> torch.Tensor:
    """One token per row of logits [n, vocab] (float32, any device; no greedy rows) -> int64 [n] on that
    device: the filters (filter_rows), then the inverse CDF of the candidates with one uniform from each
    row's own generator, drawn in row order -- a row's token depends on its logits, its parameters and
    its generator only, never on its neighbours. Nothing here waits for the device."""
    vocab = logits.shape[1]
    u = upload(torch.tensor([uniform(g) for g in generators], dtype=torch.float32), logits.device)

    def draw(x: torch.Tensor, rows: list[int], idx: torch.Tensor | None) -> torch.Tensor:
        f = filter_rows(x, [params[i] for i in rows])
        uu = u if idx is None else u[idx]
        width = f.values.shape[-1]
        if f.cum is not None:                  # ranked: the kept prefix of the running sum
            # the last candidate (a row without one -- every logit -inf, a NaN CDF -- its first token)
            last = (f.keep.sum(-1) - 1).clamp(min=0)
            total = f.cum.gather(1, last[:, None])
            j = torch.searchsorted(f.cum, uu.double()[:, None] * total, right=True)[:, 0]
            j = torch.minimum(j, last)         # u * total rounded up to the total: the last candidate
        else:
            x = f.values if f.keep is None else f.values.masked_fill(~f.keep, float("-inf"))
            cdf = x.softmax(-1).cumsum(-1)
            j = torch.searchsorted(cdf, (uu * cdf[:, -1])[:, None].contiguous(), right=True)[:, 0]
            if f.keep is None:
                j = j.clamp(max=width - 1)
            else:                              # past the end: the last kept token
                j = torch.where(j >= width, width - 1 - f.keep.flip(-1).int().argmax(-1), j)
        return j if f.ids is None else f.ids.gather(1, j[:, None])[:, 0]
    ranked = [is_ranked(p, vocab) for p in params]
    return by_group(logits, [([i for i, r in enumerate(ranked) if r == want], draw) for want in (True, False)])


GREEDY_KNOBS = (0.0, 0.0, 1.0, float("-inf"), 0.0)


def row_knobs(params: list[SamplingParams], generators: list[random.Random | None], vocab: int) -> torch.Tensor:
    """What a fused sampling kernel (pa_sample_rows_cuda) takes a row: float64 [n, 5] on the host --
    temperature, top_k (0: none), top_p, log(min_p) (-inf: none) and the row's uniform, drawn from each
    sampled row's generator in row order as Sampler.tokens draws it. A greedy row draws nothing: temperature
    0 (GREEDY_KNOBS), its argmax."""
    return torch.tensor([GREEDY_KNOBS if p.is_greedy else
                         (p.temperature, p.top_k if p.top_k and p.top_k < vocab else 0, p.top_p, log_min_p(p),
                          uniform(g))
                         for p, g in zip(params, generators)], dtype=torch.float64).reshape(len(params), 5)


class Sampler:
    """Picks one token per row, all rows at once on the logits' device (a CUDA step's logits never leave
    the GPU; only the chosen ids, and asked-for logprobs, cross to the host). Each row's randomness comes
    only from its own generator.
    argmax: the greedy rows' argmax over [n, vocab] on the logits' device (a backend's, e.g. CUDA's
    two-pass one); torch.argmax when not given.
    sample: the sampled rows' draw, sample_rows' signature and tokens (a backend's, e.g. CUDA's fused
    kernel); sample_rows when not given."""

    def __init__(self, argmax=None, sample=None):
        self._argmax = argmax if argmax is not None else (lambda logits: logits.argmax(-1))
        self._sample = sample if sample is not None else sample_rows

    def tokens(self, logits: torch.Tensor, params: list[SamplingParams], generators: list[random.Random | None],
               prompt_ids: list[list[int]] | None = None, output_ids: list[list[int]] | None = None,
               pending: torch.Tensor | None = None) -> torch.Tensor:
        """The chosen token of every row [n, vocab], on the logits' device, without waiting for it (the
        pipelined decode launches the next step from them): penalties on a copy (penalise_rows; pending:
        each row's token still on the device, as there), then greedy rows by the argmax, the others by
        sample_rows."""
        penalised = [i for i, p in enumerate(params) if has_penalties(p)]
        if penalised:
            logits = logits.clone()
            penalise_rows(logits, penalised, params, prompt_ids, output_ids, pending)
        greedy = [i for i, p in enumerate(params) if p.is_greedy]
        sampled = [i for i, p in enumerate(params) if not p.is_greedy]
        return by_group(logits, [(greedy, lambda x, r, idx: self._argmax(x)),
                                 (sampled, lambda x, r, idx: self._sample(x, [params[i] for i in r],
                                                                          [generators[i] for i in r]))])

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], prompt_ids: list[list[int]],
                 output_ids: list[list[int]], generators: list[random.Random | None]) -> list[SampleResult]:
        # logits: [num_rows, vocab] float32, on the backend's device. Penalties change a copy: logprobs
        # are under the raw model distribution.
        chosen = self.tokens(logits, params, generators, prompt_ids, output_ids)
        logprobs = logprob_rows(logits, chosen, params)      # launched before the tokens are read
        return sample_results(chosen.tolist(), logprobs, params)


class Logprobs(NamedTuple):
    """The logprobs of the rows that asked (their indices `rows`), under the raw model distribution: each
    one's chosen token's, and its n most likely tokens' (n the largest asked; a row keeps its own)."""
    rows: list[int]
    chosen: torch.Tensor            # [a] float32
    top_values: torch.Tensor        # [a, n] float32
    top_ids: torch.Tensor           # [a, n] int64

    def to_host(self) -> "Logprobs":
        """Pinned host copies in flight (non_blocking: valid once the device has passed this point)."""
        if not self.chosen.is_cuda:
            return self
        return Logprobs(self.rows, download(self.chosen), download(self.top_values), download(self.top_ids))


def logprob_rows(logits: torch.Tensor, chosen: torch.Tensor, params: list[SamplingParams]) -> Logprobs | None:
    """The asked-for logprobs of a step's rows [n, vocab] (raw logits) and their chosen tokens [n], on the
    logits' device without waiting for it; None when no row asks."""
    asked = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not asked:
        return None
    idx = upload(torch.tensor(asked), logits.device)
    raw = logits[idx].log_softmax(-1)
    mine = raw.gather(1, chosen[idx].long()[:, None])[:, 0]
    most = max(params[i].logprobs for i in asked)
    top_vals, top_ids = raw.topk(most, -1) if most else (raw[:, :0], raw[:, :0].long())
    return Logprobs(asked, mine, top_vals, top_ids)


def sample_results(tokens: list[int], logprobs: Logprobs | None,
                   params: list[SamplingParams | None]) -> list[SampleResult]:
    """One SampleResult a row from its token and, for the rows that asked, its logprobs (read here); a
    row whose params are None (its request gone) gets its token alone."""
    results = [SampleResult(t, None, None) for t in tokens]
    if logprobs is not None:
        mine, top_vals, top_ids = (t.tolist() for t in logprobs[1:])
        for r, i in enumerate(logprobs.rows):
            if params[i] is None:
                continue
            m = params[i].logprobs
            results[i] = SampleResult(tokens[i], mine[r], list(zip(top_ids[r][:m], top_vals[r][:m])))
    return results


# ---- the one-row reference ----------------------------------------------------------------------
# What the batched path above is tested against token for token (tests/test_sampler.py), and what
# benchmarks/gpu_e2e.py --sampled runs as the host-side sampler it replaced: a row at a time on the CPU.

def candidates(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Temperature, then the top-k, top-p and min-p filters of one row [vocab] -> (token ids, their scaled
    logits), or (None, every scaled logit) when nothing is filtered out; same doubling top-m search."""
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    ids = None
    if params.top_k and params.top_k < vocab:
        logits, ids = logits.topk(params.top_k)
    if params.top_p < 1.0:
        lse = torch.logsumexp(logits.double(), -1)     # float64: the boundary of a wide nucleus sits
        m = min(64, logits.shape[-1])                  # among ~1e-6 probabilities
        while True:
            vals, order = logits.topk(m)
            probs = (vals.double() - lse).exp()
            keep = (probs.cumsum(-1) - probs) < params.top_p       # the first token always stays
            if not keep[-1] or m == logits.shape[-1]:
                break
            m = min(2 * m, logits.shape[-1])
        vals, order = vals[keep], order[keep]
        ids = order if ids is None else ids[order]
        logits = vals
    if params.min_p > 0.0:                 # p_i >= min_p * p_max  <=>  logit_i >= max + log(min_p)
        keep = logits >= logits.max() + math.log(params.min_p)
        ids = keep.nonzero()[:, 0] if ids is None else ids[keep]
        logits = logits[keep]
    return ids, logits


def pick_one_row(logits: torch.Tensor, p: SamplingParams, prompt_ids: list[int], output_ids: list[int],
                 generator: random.Random | None) -> int:
    """One row [vocab] (modified in place by penalties): the token Sampler picks for it."""
    logits = apply_penalties(logits, p, prompt_ids, output_ids)
    if p.is_greedy:
        return int(logits.argmax())
    ids, kept = candidates(logits, p)
    cdf = kept.softmax(-1).cumsum(-1)
    u = torch.tensor(uniform(generator), dtype=cdf.dtype) * cdf[-1]
    j = min(int(torch.searchsorted(cdf, u, right=True)), cdf.shape[-1] - 1)
    return j if ids is None else int(ids[j])
