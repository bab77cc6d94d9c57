"""Does the paged layout's 4 KB granule cost DRAM time? (a diagnostic, not a benchmark)

The Llama-3-8B decode point of benchmarks/gpu_attention.py (B sequences x 8 kv heads x ctx tokens, group 4,
head_dim 128, 16-token blocks) has each block's kernel unit read 4 KB of K and 4 KB of V per page, pages
scattered. Here the same work is laid out as B x 8 one-kv-head sequences (so one unit = one sequence and
the same 128 / 512 units), with the pages (a) scattered, as the benchmark, or (b) in order, so each unit's
K and V are contiguous like the K/V cuDNN reads. Times in us (medians of graph replays, rotated sets).
    python3 scripts/page_locality.py [--points 16x16384 64x4096]"""
import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", nargs="+", default=["16x16384", "64x4096"])
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_attention as ga
    import torch

    from engine.backends.cuda import CudaKernels
    k = CudaKernels()
    print("| point | 8 kv heads, scattered (the benchmark) | 1 kv head x 8 seqs, scattered | 1 kv head, pages in order |")
    print("|---|---|---|---|")
    for pt in args.points:
        b, ctx = (int(x) for x in pt.split("x"))
        per_set = 2 * b * ctx * ga.NKV * ga.HD * 2
        n_sets = max(1, min(32, math.ceil(ga.ROTATE_BYTES / per_set)))
        cells = []
        case = ga.Case(b, ctx, n_sets=n_sets)
        cells.append(ga.timed(ga.run_ours(case, k, ctx, impl="tc"))[0])
        del case
        for order in ("scattered", "sequential"):
            g = torch.Generator(device="cuda").manual_seed(0)
            seqs, nblk = b * ga.NKV, ctx // ga.BS
            ctx_lens = torch.full((seqs,), ctx, dtype=torch.int32, device="cuda")
            qsl = torch.arange(seqs + 1, dtype=torch.int32, device="cuda")
            calls = []
            for _ in range(n_sets):
                kc = torch.randn(seqs * nblk, 1, ga.BS, ga.HD, generator=g, device="cuda", dtype=ga.DT)
                vc = torch.randn(seqs * nblk, 1, ga.BS, ga.HD, generator=g, device="cuda", dtype=ga.DT)
                perm = (torch.arange(seqs * nblk, device="cuda") if order == "sequential"
                        else torch.randperm(seqs * nblk, generator=g, device="cuda"))
                tables = perm.to(torch.int32).view(seqs, nblk).contiguous()
                q = torch.randn(seqs, ga.NH // ga.NKV, ga.HD, generator=g, device="cuda", dtype=ga.DT)
                calls.append(lambda q=q, kc=kc, vc=vc, t=tables: k.paged_attention_decode(
                    q, kc, vc, t, ctx_lens, qsl, ga.HD ** -0.5, ctx, ctx, impl="tc"))
            cells.append(ga.timed(calls)[0])
            del calls
            torch.cuda.empty_cache()
        print(f"| {b} / {ctx // 1024}k | " + " | ".join(f"{c * 1e6:.1f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
