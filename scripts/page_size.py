"""Does DRAM reward longer contiguous runs of K/V? (a diagnostic, not a benchmark)

The Llama-3-8B decode point of benchmarks/gpu_attention.py with the pool's block size varied: the cache is
[blocks, kv heads, block_size, head_dim], so one kv head's page is block_size x 256 bytes (4 KB at the
benchmark's 16 tokens) and one block of all 8 heads 8x that. Pages scattered (a random permutation), the
same tensor-core kernel at one partition a unit; "8 heads" is the benchmark's layout, "1 head" lays the
same work out as B x 8 one-kv-head sequences (one unit's page is then its only run). cuDNN SDPA on
contiguous K/V in the same run. Times in us (medians of graph replays, rotated sets).
    python3 scripts/page_size.py [--points 16x16384 64x4096] [--block-sizes 16 32 64 128 256]"""
import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", nargs="+", default=["16x16384", "64x4096", "16x4096", "64x16384"])
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--groups", action="store_true",
                    help="instead: 16-token pages scattered within groups of G MB of the pool (a sequence's "
                         "consecutive pages drawn from one group), G in --group-mb, against the whole pool")
    ap.add_argument("--group-mb", type=float, nargs="+", default=[2, 32])
    ap.add_argument("--interleave", action="store_true",
                    help="instead: K and V of a block side by side in one pool ([blocks, 2, heads, bs, hd], "
                         "passed as two views one block apart with even block ids) against two pools")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_attention as ga
    import torch
    from torch.nn.attention import SDPBackend

    from engine.backends.cuda import CudaKernels
    k = CudaKernels()
    if args.groups:
        return groups(args, ga, torch, k)
    if args.interleave:
        return interleave(args, ga, torch, k)
    cols = [f"{h} head{'s' if h > 1 else ''}, bs {bs}" for bs in args.block_sizes for h in (8, 1)]
    print("| point | cuDNN | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * (len(cols) + 1))
    for pt in args.points:
        b, ctx = (int(x) for x in pt.split("x"))
        per_set = 2 * b * ctx * ga.NKV * ga.HD * 2
        n_sets = max(1, min(32, math.ceil(ga.ROTATE_BYTES / per_set)))
        case = ga.Case(b, ctx, n_sets=n_sets)
        calls, conts = ga.run_sdpa(case, SDPBackend.CUDNN_ATTENTION)
        cells = [ga.timed(calls)[0]]
        del calls, conts, case
        torch.cuda.empty_cache()
        for bs in args.block_sizes:
            for heads in (8, 1):
                g = torch.Generator(device="cuda").manual_seed(0)
                seqs, nkv = (b, ga.NKV) if heads == 8 else (b * ga.NKV, 1)
                nblk = ctx // bs
                ctx_lens = torch.full((seqs,), ctx, dtype=torch.int32, device="cuda")
                qsl = torch.arange(seqs + 1, dtype=torch.int32, device="cuda")
                calls = []
                for _ in range(n_sets):
                    kc = torch.randn(seqs * nblk, nkv, bs, ga.HD, generator=g, device="cuda", dtype=ga.DT)
                    vc = torch.randn(seqs * nblk, nkv, bs, ga.HD, generator=g, device="cuda", dtype=ga.DT)
                    perm = torch.randperm(seqs * nblk, generator=g, device="cuda")
                    tables = perm.to(torch.int32).view(seqs, nblk).contiguous()
                    q = torch.randn(seqs, ga.NH * nkv // ga.NKV, ga.HD, generator=g, device="cuda", dtype=ga.DT)
                    calls.append(lambda q=q, kc=kc, vc=vc, t=tables, cl=ctx_lens, qs=qsl: k.paged_attention_decode(
                        q, kc, vc, t, cl, qs, ga.HD ** -0.5, ctx, ctx, impl="tc"))
                cells.append(ga.timed(calls)[0])
                del calls
                torch.cuda.empty_cache()
        print(f"| {b} / {ctx // 1024}k | " + " | ".join(f"{c * 1e6:.1f}" for c in cells) + " |", flush=True)


def grouped_perm(n: int, group: int, g, torch):
    """A permutation of n pool blocks in which each run of `group` consecutive logical blocks maps onto one
    group of `group` consecutive physical blocks (the groups shuffled, the blocks shuffled inside each)."""
    ng = n // group
    order = torch.randperm(ng, generator=g, device="cuda")
    inner = torch.argsort(torch.rand(ng, group, generator=g, device="cuda"), dim=1)
    return (order[:, None] * group + inner).reshape(-1)


def groups(args, ga, torch, k) -> None:
    """16-token pages, scattered over the whole pool or only within groups of G MB, 8 and 1 kv heads."""
    from torch.nn.attention import SDPBackend
    bs = 16
    layouts = [("pool", None)] + [(f"{mb:g} MB", mb) for mb in args.group_mb] + [("in order", 0)]
    cols = [f"{h} head{'s' if h > 1 else ''}, {name}" for name, _ in layouts for h in (8, 1)]
    print("| point | cuDNN | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * (len(cols) + 1))
    for pt in args.points:
        b, ctx = (int(x) for x in pt.split("x"))
        per_set = 2 * b * ctx * ga.NKV * ga.HD * 2
        n_sets = max(1, min(32, math.ceil(ga.ROTATE_BYTES / per_set)))
        case = ga.Case(b, ctx, n_sets=n_sets)
        calls, conts = ga.run_sdpa(case, SDPBackend.CUDNN_ATTENTION)
        cells = [ga.timed(calls)[0]]
        del calls, conts, case
        torch.cuda.empty_cache()
        for _, mb in layouts:
            for heads in (8, 1):
                g = torch.Generator(device="cuda").manual_seed(0)
                seqs, nkv = (b, ga.NKV) if heads == 8 else (b * ga.NKV, 1)
                nblk = ctx // bs
                n = seqs * nblk
                ctx_lens = torch.full((seqs,), ctx, dtype=torch.int32, device="cuda")
                qsl = torch.arange(seqs + 1, dtype=torch.int32, device="cuda")
                calls = []
                for _ in range(n_sets):
                    kc = torch.randn(n, nkv, bs, ga.HD, generator=g, device="cuda", dtype=ga.DT)
                    vc = torch.randn(n, nkv, bs, ga.HD, generator=g, device="cuda", dtype=ga.DT)
                    if mb is None:
                        perm = torch.randperm(n, generator=g, device="cuda")
                    elif mb == 0:
                        perm = torch.arange(n, device="cuda")
                    else:
                        group = int(mb * 2**20) // (nkv * bs * ga.HD * 2)
                        perm = grouped_perm(n, group, g, torch)
                    tables = perm.to(torch.int32).view(seqs, nblk).contiguous()
                    q = torch.randn(seqs, ga.NH * nkv // ga.NKV, ga.HD, generator=g, device="cuda", dtype=ga.DT)
                    calls.append(lambda q=q, kc=kc, vc=vc, t=tables, cl=ctx_lens, qs=qsl: k.paged_attention_decode(
                        q, kc, vc, t, cl, qs, ga.HD ** -0.5, ctx, ctx, impl="tc"))
                cells.append(ga.timed(calls)[0])
                del calls
                torch.cuda.empty_cache()
        print(f"| {b} / {ctx // 1024}k | " + " | ".join(f"{c * 1e6:.1f}" for c in cells) + " |", flush=True)


def interleave(args, ga, torch, k) -> None:
    """16-token pages scattered over the pool, K and V in two pools (the benchmark) or side by side."""
    from torch.nn.attention import SDPBackend
    bs = 16
    cols = [f"{h} head{'s' if h > 1 else ''}, {lay}" for lay in ("two pools", "K|V a block") for h in (8, 1)]
    print("| point | cuDNN | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * (len(cols) + 1))
    for pt in args.points:
        b, ctx = (int(x) for x in pt.split("x"))
        per_set = 2 * b * ctx * ga.NKV * ga.HD * 2
        n_sets = max(1, min(32, math.ceil(ga.ROTATE_BYTES / per_set)))
        case = ga.Case(b, ctx, n_sets=n_sets)
        calls, conts = ga.run_sdpa(case, SDPBackend.CUDNN_ATTENTION)
        cells = [ga.timed(calls)[0]]
        del calls, conts, case
        torch.cuda.empty_cache()
        for lay in ("two pools", "K|V a block"):
            for heads in (8, 1):
                g = torch.Generator(device="cuda").manual_seed(0)
                seqs, nkv = (b, ga.NKV) if heads == 8 else (b * ga.NKV, 1)
                nblk = ctx // bs
                n = seqs * nblk
                ctx_lens = torch.full((seqs,), ctx, dtype=torch.int32, device="cuda")
                qsl = torch.arange(seqs + 1, dtype=torch.int32, device="cuda")
                calls = []
                for _ in range(n_sets):
                    perm = torch.randperm(n, generator=g, device="cuda")
                    if lay == "two pools":
                        kc = torch.randn(n, nkv, bs, ga.HD, generator=g, device="cuda", dtype=ga.DT)
                        vc = torch.randn(n, nkv, bs, ga.HD, generator=g, device="cuda", dtype=ga.DT)
                    else:   # block p's K at pool row 2p, its V at 2p + 1: vc is the pool one row on
                        kv = torch.randn(2 * n, nkv, bs, ga.HD, generator=g, device="cuda", dtype=ga.DT)
                        kc, vc = kv[:-1], kv[1:]
                        perm = perm * 2
                    tables = perm.to(torch.int32).view(seqs, nblk).contiguous()
                    q = torch.randn(seqs, ga.NH * nkv // ga.NKV, ga.HD, generator=g, device="cuda", dtype=ga.DT)
                    calls.append(lambda q=q, kc=kc, vc=vc, t=tables, cl=ctx_lens, qs=qsl: k.paged_attention_decode(
                        q, kc, vc, t, cl, qs, ga.HD ** -0.5, ctx, ctx, impl="tc"))
                cells.append(ga.timed(calls)[0])
                del calls
                torch.cuda.empty_cache()
        print(f"| {b} / {ctx // 1024}k | " + " | ".join(f"{c * 1e6:.1f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
