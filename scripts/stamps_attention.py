"""Per-block timelines of the tensor-core decode kernel (a diagnostic, not a benchmark): a library built
with -DPA_STAMPS (`bash scripts/build_ab.sh stamps -DPA_STAMPS`) records, for every block of its last
launch, %smid and %globaltimer at entry, after the PDL wait, after its first chunk, a quarter and half way
through warp 0's chunks, when every warp's loop is done and at exit. Run in the benchmark's stream of calls
(a CUDA graph cycling K/V sets, as benchmarks/gpu_attention.py), then summarised: the spread of the blocks'
loop ends, each SM's busy time, and the streaming rate over time (each block's bytes spread over three
linear pieces of its loop, warp 0's progress standing for the block's), whose shortfall against the
middle of the launch estimates the time lost to the ramp and the tail. Session 8 found with it that the
SMs of the H200 do not stream at one rate (benchmarks/results_cuda.md).
    python3 scripts/stamps_attention.py [--lib stamps] [--points 16x16384 64x4096] [--json OUT.json]"""
import argparse
import ctypes
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", default="stamps")
    ap.add_argument("--points", nargs="+", default=["16x4096", "16x16384", "64x4096", "64x16384"])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from engine import native
    native.LIB_DIR = ROOT / "ab" / args.lib
    import gpu_attention as ga
    import torch

    from engine.backends.cuda import CudaKernels
    kernels = CudaKernels()
    dbg = ctypes.CDLL(str(native.LIB_DIR / "libpa_cuda.so"))
    dbg.pa_debug_stamps.argtypes = [ctypes.c_void_p, ctypes.c_long]
    dump = {}
    for pt in args.points:
        b, ctx = (int(x) for x in pt.split("x"))
        per_set = 2 * b * ctx * ga.NKV * ga.HD * 2
        case = ga.Case(b, ctx, n_sets=max(1, min(32, math.ceil(ga.ROTATE_BYTES / per_set))))
        part = kernels.decode_partition_tc(b, ga.NKV, ctx)
        splits = -(-ctx // part)
        nblocks = splits * ga.NKV * b
        t, _ = ga.timed(ga.run_ours(case, kernels, impl="tc"))
        torch.cuda.synchronize()
        buf = (ctypes.c_ulonglong * (nblocks * WORDS))()
        rc = dbg.pa_debug_stamps(ctypes.addressof(buf), nblocks * WORDS)
        assert rc == 0, f"pa_debug_stamps: cuda error {rc}"
        rows = [list(buf[i * WORDS:(i + 1) * WORDS]) for i in range(nblocks)]
        t0 = min(r[1] for r in rows)
        blocks = []
        for i, r in enumerate(rows):
            split = i % splits
            ntok = min(part, ctx - split * part)
            blocks.append({"sm": r[0], "entry": (r[1] - t0) / 1e3, "waited": (r[2] - t0) / 1e3,
                           "first": (r[3] - t0) / 1e3, "loop": (r[4] - t0) / 1e3, "exit": (r[5] - t0) / 1e3,
                           "q1": (r[6] - t0) / 1e3, "q2": (r[7] - t0) / 1e3,
                           "bytes": ntok * ga.HD * 2 * 2})
        dump[pt] = {"us_per_call": t * 1e6, "partition": part, "blocks": blocks}
        summarize(pt, t, part, blocks)
        del case
        torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(dump))


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def summarize(pt, t, part, blocks) -> None:
    print(f"\n## {pt}: {t * 1e6:.1f} us a call (graph), partition {part}, {len(blocks)} blocks, "
          f"{len({bl['sm'] for bl in blocks})} SMs")
    for key in ("entry", "waited", "first", "q1", "q2", "loop", "exit"):
        xs = [bl[key] for bl in blocks]
        print(f"  {key:6s} min {min(xs):7.2f}  p10 {pct(xs, .1):7.2f}  p50 {pct(xs, .5):7.2f}  "
              f"p90 {pct(xs, .9):7.2f}  max {max(xs):7.2f} us")
    # streaming rate over time
    start = min(bl["waited"] for bl in blocks)
    end = max(bl["loop"] for bl in blocks)
    nbin = 50
    w = (end - start) / nbin
    rate = [0.0] * nbin
    for bl in blocks:   # warp 0's quarter and half stamps as the block's progress: three linear pieces
        pieces = [(bl["waited"], bl["q1"], 0.25), (bl["q1"], bl["q2"], 0.25), (bl["q2"], bl["loop"], 0.5)]
        if not all(math.isfinite(x) and x > 0 for x in (bl["q1"], bl["q2"])) or not bl["waited"] <= bl["q1"] <= bl["q2"] <= bl["loop"]:
            pieces = [(bl["waited"], bl["loop"], 1.0)]
        for a, z, frac in pieces:
            r = bl["bytes"] * frac / max(z - a, 1e-3)          # bytes / us
            for k in range(nbin):
                lo, hi = start + k * w, start + (k + 1) * w
                ov = max(0.0, min(hi, z) - max(lo, a))
                rate[k] += r * ov / w
    tbs = [r / 1e6 for r in rate]                    # bytes/us -> TB/s
    peak = statistics.median(sorted(tbs)[nbin // 4: 3 * nbin // 4 + 1])
    lost = sum(max(0.0, peak - x) for x in tbs) * w / peak
    total = sum(bl["bytes"] for bl in blocks)
    print(f"  rate TB/s in {nbin} bins of {w:.2f} us: " + " ".join(f"{x:.2f}" for x in tbs))
    print(f"  middle rate {peak:.2f} TB/s; ramp + tail cost {lost:.1f} us; bytes / (last loop end - first wait) "
          f"{total / (end - start) / 1e6:.2f} TB/s; bytes / call time {total / (t * 1e12):.2f} TB/s")
    per_sm = {}
    for bl in blocks:
        per_sm.setdefault(bl["sm"], []).append(bl)
    busy = sorted((sum(x["loop"] - x["waited"] for x in v), sm) for sm, v in per_sm.items())
    print("  SM busy (sum of loop spans) fastest: " + ", ".join(f"{sm}:{u:.1f}" for u, sm in busy[:8]))
    print("  SM busy slowest: " + ", ".join(f"{sm}:{u:.1f}" for u, sm in busy[-8:]))


if __name__ == "__main__":
    main()
