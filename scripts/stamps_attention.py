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

WORDS = 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", default="stamps")
    ap.add_argument("--points", nargs="+", default=["16x4096", "16x16384", "64x4096", "64x16384"])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--chunks", action="store_true",
                    help="also every chunk's time (lane 0 of each warp): the rate the call consumes K/V at")
    args = ap.parse_args()
    from ab_attention import ab_kernels
    kernels = ab_kernels(args.lib)
    import gpu_attention as ga
    import torch

    from engine import native
    dbg = ctypes.CDLL(str(native.LIB_DIR / "libpa_cuda.so"))
    dbg.pa_debug_stamps.argtypes = [ctypes.c_void_p, ctypes.c_long]
    dbg.pa_debug_chunks.argtypes = [ctypes.c_void_p, ctypes.c_long]
    dump = {}
    for pt in args.points:
        b, ctx = (int(x) for x in pt.split("x"))
        case = ga.Case(b, ctx, n_sets=ga.rotated_sets(b, ctx))
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
        if args.chunks:
            nw = 8 if b * ga.NKV < kernels.num_sms else 4     # launch_tc's choice (decode_attention_tc.cu)
            cbuf = (ctypes.c_ulonglong * (nblocks * 8 * 256))()
            assert dbg.pa_debug_chunks(ctypes.addressof(cbuf), nblocks * 8 * 256) == 0
            times = []
            for i in range(nblocks):
                split = i % splits
                nch = -(-min(part, ctx - split * part) // 16)
                for w in range(nw):
                    mine = max(0, -(-(nch - w) // nw))
                    base = (i * 8 + w) * 256
                    times += [(cbuf[base + j] - t0) / 1e3 for j in range(min(mine, 256))]
            dump[pt]["chunks"] = times
            if args.json:
                args.json.write_text(json.dumps(dump))
            chunk_curve(pt, times, ga.HD * 2 * 2 * 16, t)
        del case
        torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(dump))


def chunk_curve(pt, times, chunk_bytes, t_call) -> None:
    """Bytes consumed over the call from every chunk's time: where the time a constant rate would not need
    goes (before 10 % of the bytes, between 10 and 90 %, after 90 %)."""
    times = sorted(times)
    n = len(times)
    first, last = times[0], times[-1]
    w = 0.5
    nbin = int((last - first) / w) + 1
    cnt = [0] * nbin
    for x in times:
        cnt[min(nbin - 1, int((x - first) / w))] += 1
    rate = [c * chunk_bytes / (w * 1e6) for c in cnt]          # TB/s
    i10, i90 = times[n // 10], times[9 * n // 10]
    if i90 <= i10:
        print(f"  chunks: {n}; 10 % and 90 % of them at the same time {i10:.2f} us: no curve")
        return
    mid = (0.8 * n * chunk_bytes) / ((i90 - i10) * 1e6)
    need = n * chunk_bytes / (mid * 1e6)
    print(f"  chunks: {n} x {chunk_bytes // 1024} KB; first {first:.2f} us, last {last:.2f} us after the first entry; "
          f"5/50/95/99 % of bytes at {times[n // 20]:.2f} / {times[n // 2]:.2f} / {times[19 * n // 20]:.2f} / "
          f"{times[99 * n // 100]:.2f} us")
    print(f"  rate between 10 and 90 % of the bytes {mid:.2f} TB/s; first-to-last {last - first:.1f} us against "
          f"{need:.1f} at that rate: ramp (to 10 %) {i10 - first - 0.1 * need:.1f} us, tail (from 90 %) "
          f"{last - i90 - 0.1 * need:.1f} us; call (graph) {t_call * 1e6:.1f} us")
    step = max(1, nbin // 40)
    print("  TB/s by 0.5 us bin (every " + str(step) + "): " + " ".join(f"{r:.1f}" for r in rate[::step]))


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
