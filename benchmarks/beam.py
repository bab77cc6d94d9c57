"""Beam search speed: W=4 beam tokens/s beside greedy with the same number of sequences, and beside HF.

    .venv/bin/python benchmarks/beam.py [--backend cpu-int8] [--tokens 32] [--rounds 3]

A beam step generates W tokens (one per live beam), so beam tokens/s = W * steps / time; greedy runs
W independent sequences of the same prompt length. HF runs generate(num_beams=4) on the same GGUF.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["The history of the printing press begins", "A good recipe for bread needs",
           "The most important idea in computer science is"]


def ours(backend: str, width: int, tokens: int, rounds: int) -> tuple[float, float]:
    from engine.beam import BeamParams
    from engine.config import EngineConfig
    from engine.decoder import Decoder
    from engine.sequence import SamplingParams
    dec = Decoder(None, EngineConfig(backend=backend))
    beam_rates, greedy_rates = [], []
    try:
        dec.generate(PROMPTS[0], max_tokens=4)
        for _ in range(rounds):
            for prompt in PROMPTS:
                start = time.perf_counter()
                res = dec.beam_search(prompt, BeamParams(beam_width=width, max_tokens=tokens, early_stopping="never"))
                elapsed = time.perf_counter() - start
                beam_rates.append(width * res.num_generated_tokens / elapsed)
                params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
                start = time.perf_counter()
                outs = dec.generate([prompt] * width, params)
                greedy_rates.append(sum(o.num_generated_tokens for o in outs) / (time.perf_counter() - start))
    finally:
        dec.close()
    return statistics.median(beam_rates), statistics.median(greedy_rates)


def hf(width: int, tokens: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from engine.weights import default_model_path
    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    rates = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            enc = tok(prompt, return_tensors="pt")
            start = time.perf_counter()
            out = model.generate(**enc, num_beams=width, do_sample=False, max_new_tokens=tokens,
                                 min_new_tokens=tokens, early_stopping=False)
            generated = out.shape[1] - enc["input_ids"].shape[1]
            rates.append(width * generated / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="cpu-int8")
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    beam, greedy = ours(args.backend, args.width, args.tokens, args.rounds)
    theirs = None if args.skip_hf else hf(args.width, args.tokens)
    print(f"\n| W={args.width}, {args.tokens} new tokens | tokens/s | cost per token vs greedy |")
    print("|---|---|---|")
    print(f"| pagedecode greedy, {args.width} sequences ({args.backend}) | {greedy:.1f} | 1.00x |")
    print(f"| pagedecode beam search ({args.backend}) | {beam:.1f} | {greedy / beam:.2f}x |")
    if theirs:
        print(f"| HF transformers fp32 num_beams={args.width} | {theirs:.1f} | {greedy / theirs:.2f}x "
              f"(pagedecode beam is {beam / theirs:.1f}x faster) |")


if __name__ == "__main__":
    main()
