"""The batched sampler on the GPU, a step's worth of rows at a time, next to what HF transformers does for the
same request (its TopPLogitsWarper: a row sort, cumsum, scatter, then torch.multinomial).

Per batch size and vocabulary: the whole-row descending sort two ways (torch's row sort, one thread block a row;
engine.sampler.sort_rows_descending's flattened int64 keys), and Sampler.tokens end to end (host work included:
each call synchronised) at T=1.0 and at T=0.7 / top_p=0.9, with each sort, against the HF-style warper chain.
Logits are flat (random-weights-like: a nucleus of most of the vocabulary, the sort's worst case) or peaked
(a trained model's: a nucleus of a few tokens).

    python3 benchmarks/gpu_sampler.py [--batches 1 32 128] [--vocabs 49152 128256]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engine.sampler as sampler_module  # noqa: E402
from engine.sampler import Sampler, make_generator, sort_rows_descending  # noqa: E402
from engine.sequence import SamplingParams  # noqa: E402


def wall_ms(fn, reps: int = 30) -> float:
    """Median wall time of fn() with the device drained before and after (host work included)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def hf_top_p(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """transformers' TemperatureLogitsWarper + TopPLogitsWarper + multinomial, as generate(do_sample) runs them."""
    scores = logits / temperature
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1:] = 0
    remove = remove.scatter(1, sorted_indices, remove)
    scores = scores.masked_fill(remove, float("-inf"))
    return torch.multinomial(scores.softmax(-1), num_samples=1)[:, 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--vocabs", type=int, nargs="+", default=[49152, 128256])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    lines = ["| logits | batch | vocab | row sort ms | flat sort ms | T=1.0 ms | top-p, flat sort ms | top-p, row sort ms "
             "| HF top-p warper + multinomial ms | HF / ours (top-p) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    sampler = Sampler()
    row_sort = lambda x, flat=True: sort_rows_descending(x, flat=False)      # noqa: E731
    flat_sort = sampler_module.sort_rows_descending
    for kind, scale in (("flat", 0.5), ("peaked", 8.0)):
        for vocab in args.vocabs:
            for n in args.batches:
                g = torch.Generator(device="cuda").manual_seed(n)
                x = torch.randn(n, vocab, device="cuda", generator=g) * scale
                gens = [make_generator(i) for i in range(n)]
                t1 = [SamplingParams(temperature=1.0)] * n
                tp = [SamplingParams(temperature=0.7, top_p=0.9)] * n
                r_row = wall_ms(lambda: x.sort(-1, descending=True))
                r_flat = wall_ms(lambda: sort_rows_descending(x))
                s_t1 = wall_ms(lambda: sampler.tokens(x, t1, gens))
                s_flat = wall_ms(lambda: sampler.tokens(x, tp, gens))
                sampler_module.sort_rows_descending = row_sort
                s_row = wall_ms(lambda: sampler.tokens(x, tp, gens))
                sampler_module.sort_rows_descending = flat_sort
                hf = wall_ms(lambda: hf_top_p(x, 0.7, 0.9))
                lines.append(f"| {kind} | {n} | {vocab} | {r_row:.3f} | {r_flat:.3f} | {s_t1:.3f} | {s_flat:.3f} | "
                             f"{s_row:.3f} | {hf:.3f} | {hf / s_flat:.2f}x |")
                print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
