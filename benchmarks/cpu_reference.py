"""Reference backend vs HF transformers on this CPU: decode tok/s at batch 1 and 8, and start-up time.

    .venv/bin/python benchmarks/cpu_reference.py [--tokens 64] [--backend torch]

Prints a table; figures, not tests. Start-up is measured from process launch to the first generated
token of `pagedecode generate` in a fresh process (the tokenizer cache already built).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "Write a short story about a robot who learns to paint."


def startup_seconds(backend: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "engine.cli", "generate", PROMPT, "--max-tokens", "1",
                    "--backend", backend], cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def ours(backend: str, tokens: int, batch: int) -> float:
    from engine.config import EngineConfig
    from engine.decoder import Decoder
    from engine.sequence import SamplingParams
    dec = Decoder(None, EngineConfig(backend=backend))
    try:
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        dec.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=4))      # warm-up
        prompts = [f"{PROMPT} Variant {i}." for i in range(batch)]
        start = time.perf_counter()
        results = dec.generate(prompts, params)
        elapsed = time.perf_counter() - start
        return sum(r.num_generated_tokens for r in results) / elapsed
    finally:
        dec.close()


def hf(tokens: int, batches: list[int]) -> tuple[float, dict[int, float]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from engine.weights import default_model_path
    path = default_model_path()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    load_s = time.perf_counter() - start
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rates = {}
    for batch in batches:
        enc = tok([f"{PROMPT} Variant {i}." for i in range(batch)], return_tensors="pt", padding=True)
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=4, do_sample=False)
            start = time.perf_counter()
            model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        rates[batch] = batch * tokens / (time.perf_counter() - start)
    return load_s, rates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    starts = [startup_seconds(args.backend) for _ in range(3)]
    rows = [(b, ours(args.backend, args.tokens, b)) for b in (1, 8)]
    load_s, hf_rates = (None, {}) if args.skip_hf else hf(args.tokens, [1, 8])
    print(f"\n| measure | pagedecode ({args.backend}) | HF transformers fp32 | ratio |")
    print("|---|---|---|---|")
    for batch, rate in rows:
        theirs = hf_rates.get(batch)
        ratio = f"{rate / theirs:.2f}x" if theirs else "-"
        print(f"| decode tok/s, batch {batch} | {rate:.1f} | {theirs and f'{theirs:.1f}' or '-'} | {ratio} |")
    med = statistics.median(starts)
    print(f"| launch -> first token (s), median of 3 | {med:.2f} | {load_s and f'{load_s:.1f} (load only)' or '-'} "
          f"| {load_s and f'{load_s / med:.1f}x' or '-'} |")


if __name__ == "__main__":
    main()
