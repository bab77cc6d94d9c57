"""What does the layout of the paged K/V cost the decode kernel? (a diagnostic, not a benchmark)

The Llama-3-8B decode points of benchmarks/gpu_attention.py (32 q / 8 kv heads, head_dim 128, bf16), the
tensor-core kernel at one partition a unit, on pools laid out differently, next to cuDNN SDPA on contiguous
K/V in the same run. The pool is [blocks, kv heads, block_size, head_dim], so one kv head's page is
block_size x 256 bytes (4 KB at the benchmark's 16 tokens). "8 heads" is the benchmark's layout; "1 head"
lays the same work out as B x 8 one-kv-head sequences, so each unit's page is its only contiguous run.
Modes (times in us, medians of graph replays over rotated sets):
  (default)     block sizes --block-sizes, pages scattered over the pool (a random permutation);
  --groups      16-token pages scattered over the pool, only within groups of --group-mb MB (a sequence's
                consecutive pages drawn, shuffled, from one group: the same runs, fewer translation pages),
                or in order (each unit's K/V contiguous, as cuDNN reads them);
  --served      16-token pages as the engine's BlockManager places them on a busy pool (benchmarks/kv_layout.py),
                next to scattered and in order (cells: us (cuDNN / it));
  --interleave  16-token pages scattered, K and V in two pools (the benchmark) or a block's K and V side by
                side in one pool ([blocks, 2, heads, 16, 128], passed as two views one block apart, even
                block ids).
    python3 scripts/page_size.py [--points 16x16384 64x4096] [--block-sizes 16 256 | --groups | --interleave |
                                 --served] [--rounds N] [--lib NAME]
Results: benchmarks/results_cuda.md session 9 (and session 8 call 6, which ran the in-order case)."""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.kv_layout import served_tables  # noqa: E402


def grouped_perm(n: int, group: int, g, torch, shuffle: bool = True):
    """A permutation of n pool blocks in which each run of `group` consecutive logical blocks maps onto one
    group of `group` consecutive physical blocks (the groups shuffled; the blocks shuffled inside each, or in
    order when not `shuffle`: then a unit reads runs of `group` pages)."""
    ng = n // group
    order = torch.randperm(ng, generator=g, device="cuda")
    if shuffle:
        inner = torch.argsort(torch.rand(ng, group, generator=g, device="cuda"), dim=1)
    else:
        inner = torch.arange(group, device="cuda").expand(ng, group)
    return (order[:, None] * group + inner).reshape(-1)


def layout_calls(ga, torch, kernels, b: int, ctx: int, n_sets: int, heads: int, bs: int, pages: str,
                 group_mb: float = 0.0) -> list:
    """n_sets decode calls over pools of one layout. pages: 'pool' (scattered), 'group' (scattered within
    group_mb MB), 'order' (each unit's pages in order), 'kv' (scattered, K|V of a block side by side in
    one pool), 'extent' (runs of int(group_mb) pages in order, the runs scattered) or 'served' (the engine's
    allocator on a busy pool)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    seqs, nkv = (b, ga.NKV) if heads == ga.NKV else (b * ga.NKV, 1)
    nblk = ctx // bs
    n = seqs * nblk
    ctx_lens = torch.full((seqs,), ctx, dtype=torch.int32, device="cuda")
    qsl = torch.arange(seqs + 1, dtype=torch.int32, device="cuda")
    calls = []
    for _ in range(n_sets):
        served = None
        if pages == "served":   # the engine's BlockManager on a busy pool (benchmarks/kv_layout.py)
            served, n = served_tables(seqs, ctx, bs, seed=len(calls))
        if pages == "kv":       # block p's K at pool row 2p, its V at 2p + 1: vc is the pool one row on
            kv = torch.randn(2 * n, nkv, bs, ga.HD, generator=g, device="cuda", dtype=ga.DT)
            kc, vc = kv[:-1], kv[1:]
        else:
            kc = torch.randn(n, nkv, bs, ga.HD, generator=g, device="cuda", dtype=ga.DT)
            vc = torch.randn(n, nkv, bs, ga.HD, generator=g, device="cuda", dtype=ga.DT)
        if served is not None:
            tables = torch.tensor(served, dtype=torch.int32, device="cuda")
        else:
            if pages == "order":
                perm = torch.arange(n, device="cuda")
            elif pages == "group":
                perm = grouped_perm(n, int(group_mb * 2**20) // (nkv * bs * ga.HD * 2), g, torch)
            elif pages == "extent":     # runs of int(group_mb) pages in order, the runs scattered
                perm = grouped_perm(n, int(group_mb), g, torch, shuffle=False)
            else:
                perm = torch.randperm(n, generator=g, device="cuda") * (2 if pages == "kv" else 1)
            tables = perm.to(torch.int32).view(seqs, nblk).contiguous()
        q = torch.randn(seqs, ga.NH * nkv // ga.NKV, ga.HD, generator=g, device="cuda", dtype=ga.DT)
        calls.append(lambda q=q, kc=kc, vc=vc, t=tables: kernels.paged_attention_decode(
            q, kc, vc, t, ctx_lens, qsl, ga.HD ** -0.5, ctx, ctx, impl="tc"))
    return calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", nargs="+", default=["16x16384", "64x4096", "16x4096", "64x16384"])
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--groups", action="store_true", help="pages within groups of --group-mb MB, or in order")
    mode.add_argument("--interleave", action="store_true", help="K and V of a block side by side in one pool")
    mode.add_argument("--extents", type=int, nargs="+", default=None, metavar="PAGES",
                      help="16-token pages in runs of PAGES in order, the runs scattered (1 head: a kv-head-major "
                           "pool), next to scattered and in order")
    mode.add_argument("--served", action="store_true",
                      help="what the engine's allocator hands out on a busy pool, next to scattered and in order")
    ap.add_argument("--rounds", type=int, default=1, help="time every column this many times, in turn")
    ap.add_argument("--group-mb", type=float, nargs="*", default=[2, 32])
    ap.add_argument("--lib", default=None, help="the kernel of ab/LIB/libpa_cuda.so (scripts/build_ab.sh)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_attention as ga
    import torch
    from torch.nn.attention import SDPBackend

    if args.lib:
        from ab_attention import ab_kernels
        kernels = ab_kernels(args.lib)
    else:
        from engine.backends.cuda import CudaKernels
        kernels = CudaKernels()
    if args.groups:         # (label, block size, pages, group MB)
        layouts = ([("pool", 16, "pool", 0.0)] + [(f"{mb:g} MB", 16, "group", mb) for mb in args.group_mb]
                   + [("in order", 16, "order", 0.0)])
    elif args.extents:
        layouts = ([("pool", 16, "pool", 0.0)] + [(f"runs of {e}", 16, "extent", float(e)) for e in args.extents]
                   + [("in order", 16, "order", 0.0)])
    elif args.served:
        layouts = [("scattered", 16, "pool", 0.0), ("served", 16, "served", 0.0), ("in order", 16, "order", 0.0)]
    elif args.interleave:
        layouts = [("two pools", 16, "pool", 0.0), ("K|V a block", 16, "kv", 0.0)]
    else:
        layouts = [(f"bs {bs}", bs, "pool", 0.0) for bs in args.block_sizes]
    cols = [(f"{h} head{'s' if h > 1 else ''}, {label}", h, bs, pages, mb)
            for label, bs, pages, mb in layouts for h in ((ga.NKV,) if args.served else (ga.NKV, 1))]
    print("| point | cuDNN | " + " | ".join(c[0] for c in cols) + " |")
    print("|---|" + "---|" * (len(cols) + 1))
    for pt in args.points:
        b, ctx = (int(x) for x in pt.split("x"))
        n_sets = ga.rotated_sets(b, ctx)
        for _ in range(args.rounds):
            case = ga.Case(b, ctx, n_sets=n_sets)
            calls, conts = ga.run_sdpa(case, SDPBackend.CUDNN_ATTENTION)
            cells = [ga.timed(calls)[0]]
            del calls, conts, case
            torch.cuda.empty_cache()
            for _, heads, bs, pages, mb in cols:
                calls = layout_calls(ga, torch, kernels, b, ctx, n_sets, heads, bs, pages, mb)
                cells.append(ga.timed(calls)[0])
                del calls
                torch.cuda.empty_cache()
            print(f"| {b} / {ctx // 1024}k | " + " | ".join(f"{c * 1e6:.1f} ({cells[0] / c:.3f}x)" if i else
                                                           f"{c * 1e6:.1f}" for i, c in enumerate(cells)) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
