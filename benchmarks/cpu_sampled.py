"""Sampled decoding on the INT8 CPU backend: the native sampler (pa_sample_rows_cpu, CpuInt8Backend.sample) next
to engine/sampler.py's torch path (sample_rows: a sort of the vocabulary) and greedy decoding, in one run.

1. The sampler alone, ms a call for one row of random logits (flat: a random-weights-like nucleus of most of
   the vocabulary; peaked: a trained model's), the torch path against the native one.
2. The embedded model (SmolLM2-135M-Instruct, INT8Decoder's engine stepped from this thread), decode tok/s at
   1 and 8 concurrent requests of a fixed prompt, greedy / T=0.7 + top_p=0.95 (the chat page's setting) /
   T=1.0 (an OpenAI client's default) / T=1.3 + top_p=0.98 (a creative setting: a wide nucleus), seeded; native and torch-path runs alternated --rounds times,
   medians. Decode steps only (prefill steps are timed apart and left out). OMP_WAIT_POLICY=PASSIVE and 2
   threads, as the server runs.

    .venv/bin/python benchmarks/cpu_sampled.py [--rounds 3] [--tokens 64] [--concurrency 1 8] [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")     # as the server sets it (webapp/serve.py, wsgi.py)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cpu_kernels import timed  # noqa: E402
from benchmarks.report import emit  # noqa: E402
from engine.sampler import Sampler, make_generator  # noqa: E402
from engine.sequence import SamplingParams  # noqa: E402

SETTINGS = {"greedy": dict(temperature=0.0), "T=0.7, top_p=0.95": dict(temperature=0.7, top_p=0.95),
            "T=1.0": dict(temperature=1.0), "T=1.3, top_p=0.98": dict(temperature=1.3, top_p=0.98)}


def sampler_table(backend, vocab: int) -> list[str]:
    lines = ["| logits | setting | torch path ms | native ms | torch path / native |", "|---|---|---|---|---|"]
    native, torch_path = Sampler(sample=backend.sample), Sampler()
    for kind, scale in (("flat", 0.5), ("peaked", 8.0)):
        x = torch.randn(1, vocab, generator=torch.Generator().manual_seed(1)) * scale
        for label, kw in SETTINGS.items():
            if not kw["temperature"]:
                continue
            p = [SamplingParams(**kw)]
            a = timed(lambda: torch_path.tokens(x, p, [make_generator(0)]), 30, warmup=3) * 1e3
            b = timed(lambda: native.tokens(x, p, [make_generator(0)]), 30, warmup=3) * 1e3
            lines.append(f"| {kind} | {label} | {a:.3f} | {b:.3f} | {a / b:.1f}x |")
            print(lines[-1], flush=True)
    return lines


def decode_tok_s(engine, prompts: list[list[int]], params: SamplingParams) -> float:
    """Decode tokens a second of one batch of requests (steps that ran no prompt token)."""
    counters = engine.counters
    handles = [engine.submit(list(p), SamplingParams(**{**vars(params), "seed": 100 + i}))
               for i, p in enumerate(prompts)]
    todo, pre0 = sum(map(len, prompts)), counters["prefill_tokens"]
    decode_s, tokens = 0.0, 0
    while engine.has_work():
        prefilling = counters["prefill_tokens"] - pre0 < todo
        gen0 = counters["tokens_generated"]
        t0 = time.perf_counter()
        engine.step()
        if not prefilling:
            decode_s += time.perf_counter() - t0
            tokens += counters["tokens_generated"] - gen0
    for h in handles:
        h.result()
    return tokens / decode_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from engine.config import EngineConfig
    from engine.decoder import INT8Decoder
    dec = INT8Decoder(config=EngineConfig(backend="cpu-int8", num_threads=2, enable_prefix_caching=False), start=False)
    engine, backend = dec.engine, dec.engine.backend
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"vocab {engine.model_config.vocab_size}", flush=True)
    lines = ["The sampler alone (one row):", ""] + sampler_table(backend, engine.model_config.vocab_size)
    ids = dec.tokenizer.apply_chat_template([{"role": "user", "content": "Write a short story about a lighthouse "
                                                                          "keeper who finds a message in a bottle."}])
    native_sampler, torch_sampler = engine.sampler, Sampler(argmax=backend.argmax)
    lines += ["", f"Decode tok/s, {args.tokens} tokens a request, medians of {args.rounds} alternated rounds:", "",
              "| requests | setting | native sampler | torch-path sampler | native / torch path | native / greedy |",
              "|---|---|---|---|---|---|"]
    for n in args.concurrency:
        prompts = [ids] * n
        greedy = None
        for label, kw in SETTINGS.items():
            params = SamplingParams(**kw, max_tokens=args.tokens, ignore_eos=True)
            runs: dict[str, list[float]] = {"native": [], "torch": []}
            for k in range(args.rounds):                 # (each goes first in turn)
                pair = (("native", native_sampler), ("torch", torch_sampler))
                for name, sampler in pair[::1 if k % 2 == 0 else -1]:
                    engine.sampler = sampler
                    runs[name].append(decode_tok_s(engine, prompts, params))
            engine.sampler = native_sampler
            a, b = statistics.median(runs["native"]), statistics.median(runs["torch"])
            greedy = a if greedy is None else greedy
            lines.append(f"| {n} | {label} | {a:,.0f} | {b:,.0f} | {a / b:.2f}x | {a / greedy:.2f}x |")
            print(lines[-1], flush=True)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
