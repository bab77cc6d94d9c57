"""The batched sampler on the GPU, a step's worth of rows at a time, next to what HF transformers does for the
same request (its TopPLogitsWarper: a row sort, cumsum, scatter, then torch.multinomial).

Per batch size and vocabulary: torch's descending row sort alone, and Sampler.tokens end to end (host work
included: each call synchronised) at T=1.0 and at T=0.7 / top_p=0.9, through the torch path (sample_rows:
a row sort, scans, ~20 launches) and through the fused kernel the CUDA backend runs (pa_sample_rows_cuda:
one launch, no sort; also with top_k=50 + top_p=0.95 + min_p=0.05 together), against the HF-style warper
chain; --profile prints torch.profiler's op table of the torch path's top-p call at the smallest and largest
batch.
Logits are flat (random-weights-like: a nucleus of most of the vocabulary, the sort's worst case) or peaked
(a trained model's: a nucleus of a few tokens).

    python3 benchmarks/gpu_sampler.py [--batches 1 32 128] [--vocabs 49152 128256] [--profile]
    python3 benchmarks/gpu_sampler.py --clusters --batches 1 2 4 8 16 32   (the kernel at 1 / 2 / 4 / 8 blocks a row)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import emit  # noqa: E402
from engine.backends.cuda import CudaKernels, fused_sample  # noqa: E402
from engine.sampler import Sampler, make_generator, row_knobs, upload  # noqa: E402
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


def device_us(fn, reps: int = 50) -> float:
    """Device time of fn() in us: reps launches captured in one CUDA graph, the median of 5 replays between
    two CUDA events. (Until session 16 the launches were timed as issued from Python, whose ~20 us a call
    was the floor under anything faster.)"""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps * 1e3)
    return statistics.median(times)


def cluster_table(kernels, batches: list[int], vocabs: list[int]) -> list[str]:
    """--clusters: the kernel alone (device us, T=1.0 / top-p) at 1, 2, 4 and 8 blocks a row, flat and peaked
    rows, next to what the kernel picks itself: the data its automatic choice is drawn from."""
    lines = ["| logits | batch | vocab | 1 block a row | 2 | 4 | 8 | kernel's choice (blocks) |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, scale in (("flat", 0.5), ("peaked", 8.0)):
        for vocab in vocabs:
            for n in batches:
                g = torch.Generator(device="cuda").manual_seed(n)
                x = torch.randn(n, vocab, device="cuda", generator=g) * scale
                gens = [make_generator(i) for i in range(n)]
                knobs = [upload(row_knobs([p] * n, gens, vocab), x.device)
                         for p in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.9))]
                out = torch.empty(n, dtype=torch.int64, device="cuda")
                cells = []
                for ranks in (1, 2, 4, 8, 0):
                    t1, tp = (device_us(lambda k=k: kernels.sample_rows(x, k, out=out, blocks_per_row=ranks))
                              for k in knobs)
                    cells.append(f"{t1:.1f} / {tp:.1f}")
                lines.append(f"| {kind} | {n} | {vocab} | " + " | ".join(cells) + f" ({auto_ranks(n, vocab)}) |")
                print(lines[-1], flush=True)
    return lines


def auto_ranks(n: int, vocab: int) -> int:
    """The kernel's own choice of blocks a row (auto_blocks_per_row in native/cuda/sample.cu)."""
    return 4 if n * 4 * 2 <= torch.cuda.get_device_properties(0).multi_processor_count and vocab >= 16384 else 1


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
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--probe", action="store_true",
                    help="only a few fused-kernel calls (T=1.0, then top-p) per shape, on flat logits: for ncu")
    ap.add_argument("--clusters", action="store_true",
                    help="only the kernel alone at 1 / 2 / 4 / 8 blocks a row (device us)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    if args.probe:
        kernels = CudaKernels()
        for vocab in args.vocabs:
            for n in args.batches:
                x = torch.randn(n, vocab, device="cuda") * 0.5
                gens = [make_generator(i) for i in range(n)]
                for p in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.9)):
                    knobs = upload(row_knobs([p] * n, gens, vocab), x.device)
                    for _ in range(2):
                        kernels.sample_rows(x, knobs)
                    torch.cuda.synchronize()
                    print(f"probe: batch {n} vocab {vocab} {p.top_p=}", flush=True)
        return
    if args.clusters:
        emit(cluster_table(CudaKernels(), args.batches, args.vocabs), args.out)
        return
    lines = ["| logits | batch | vocab | row sort ms | torch path T=1.0 ms | torch path T=0.7, top_p=0.9 ms | "
             "fused T=1.0 ms | fused T=0.7, top_p=0.9 ms | fused top_k+top_p+min_p ms | HF top-p warper + "
             "multinomial ms | HF / fused (top-p) | torch path / fused (top-p) | fused kernel alone, device us "
             "(T=1.0 / top-p; blocks a row) | one block a row, device us (T=1.0 / top-p) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    sampler = Sampler()
    kernels = CudaKernels()
    fused = Sampler(sample=lambda x, p, g: fused_sample(kernels, x, p, g))
    for kind, scale in (("flat", 0.5), ("peaked", 8.0)):
        for vocab in args.vocabs:
            for n in args.batches:
                g = torch.Generator(device="cuda").manual_seed(n)
                x = torch.randn(n, vocab, device="cuda", generator=g) * scale
                gens = [make_generator(i) for i in range(n)]
                t1 = [SamplingParams(temperature=1.0)] * n
                tp = [SamplingParams(temperature=0.7, top_p=0.9)] * n
                mix = [SamplingParams(temperature=0.8, top_k=50, top_p=0.95, min_p=0.05)] * n
                r_row = wall_ms(lambda: x.sort(-1, descending=True))
                s_t1 = wall_ms(lambda: sampler.tokens(x, t1, gens))
                s_tp = wall_ms(lambda: sampler.tokens(x, tp, gens))
                f_t1 = wall_ms(lambda: fused.tokens(x, t1, gens))
                f_tp = wall_ms(lambda: fused.tokens(x, tp, gens))
                f_mix = wall_ms(lambda: fused.tokens(x, mix, gens))
                hf = wall_ms(lambda: hf_top_p(x, 0.7, 0.9))
                k_t1, k_tp = (upload(row_knobs(p, gens, vocab), x.device) for p in (t1, tp))
                d_t1 = device_us(lambda: kernels.sample_rows(x, k_t1))
                d_tp = device_us(lambda: kernels.sample_rows(x, k_tp))
                o_t1 = device_us(lambda: kernels.sample_rows(x, k_t1, blocks_per_row=1))
                o_tp = device_us(lambda: kernels.sample_rows(x, k_tp, blocks_per_row=1))
                lines.append(f"| {kind} | {n} | {vocab} | {r_row:.3f} | {s_t1:.3f} | {s_tp:.3f} | {f_t1:.3f} | "
                             f"{f_tp:.3f} | {f_mix:.3f} | {hf:.3f} | {hf / f_tp:.2f}x | {s_tp / f_tp:.2f}x | "
                             f"{d_t1:.1f} / {d_tp:.1f} ({auto_ranks(n, vocab)}) | {o_t1:.1f} / {o_tp:.1f} |")
                print(lines[-1], flush=True)
                ends = (args.batches[0], args.batches[-1])
                if args.profile and kind == "flat" and vocab == args.vocabs[0] and n in ends:
                    from torch.profiler import ProfilerActivity, profile
                    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                        for _ in range(5):
                            sampler.tokens(x, tp, gens)
                        torch.cuda.synchronize()
                    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18), flush=True)
                    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12), flush=True)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
