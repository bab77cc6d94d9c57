"""Decode attention on the GPU: our paged kernels (CUDA-core 'simt' and tensor-core 'tc') against torch SDPA (contiguous KV), gather-then-SDPA and
FlexAttention's paged path, for a Llama-3-8B layer (32 q heads, 8 KV heads, head_dim 128, bf16, 16-token
blocks). Times are medians of CUDA-graph replays (many calls per replay, input sets rotated so the L2
does not hold them); bandwidth = K+V bytes / time, and its share of a measured device-to-device copy.

    python3 benchmarks/gpu_attention.py [--batches 1 16 64] [--contexts 1024 4096 16384] [--out FILE]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.kv_layout import layout_stats, served_tables  # noqa: E402
from benchmarks.report import emit  # noqa: E402

NH, NKV, HD, BS = 32, 8, 128, 16
DT = torch.bfloat16
ROTATE_BYTES = 256 << 20          # at least this much K/V across rotated sets (L2 is 60 MB)
GROUP_PAGES = 2 * 2**20 // (NKV * BS * HD * DT.itemsize)     # one kv head's pages in 2 MB of a pool: 64


def rotated_sets(batch: int, ctx: int) -> int:
    """How many independent K/V sets a (batch, ctx) point cycles through: ROTATE_BYTES' worth, 1 to 32."""
    return max(1, min(32, math.ceil(ROTATE_BYTES / (2 * batch * ctx * NKV * HD * DT.itemsize))))


def timed(calls, min_calls: int = 40, replays: int = 15) -> tuple[float, str]:
    """Median seconds per call: a CUDA graph of >= min_calls calls cycling the sets, replayed."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    inner = max(1, math.ceil(min_calls / len(calls)))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(inner):
                for c in calls:
                    c()
        run, how = g.replay, "graph"
    except Exception as exc:  # noqa: BLE001 - fall back to a loop behind a sleep kernel
        print(f"    (graph capture failed: {type(exc).__name__}: {str(exc)[:120]}; timing a loop)")
        torch.cuda.synchronize()

        def run():
            for _ in range(inner):
                for c in calls:
                    c()
        how = "loop"
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        if how == "loop":
            torch.cuda._sleep(2_000_000)          # let the CPU queue the calls ahead of the GPU
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / (inner * len(calls)))
    return statistics.median(times), how


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 4 GiB device-to-device copy (after ~1 s of warm-up work,
    so the clocks have left idle)."""
    n = 1 << 31
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    t_end = time.time() + 1.0
    while time.time() < t_end:
        dst.copy_(src)
        torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):          # eager copies (a graph's memcpy node took a slower path here: 2.7 TB/s)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    t = statistics.median(times)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 / t


class Case:
    """One (batch, context) point: n_sets independent paged caches, their contiguous copies, queries."""

    def __init__(self, batch: int, ctx: int, n_sets: int, seed: int = 0, pages: str = "scattered"):
        g = torch.Generator(device="cuda").manual_seed(seed)
        self.batch, self.ctx, self.n_sets = batch, ctx, n_sets
        nblk = ctx // BS
        self.num_blocks = batch * nblk
        self.sets, self.layouts = [], []
        for i in range(n_sets):
            if pages == "served":              # what the engine's BlockManager hands out on a busy pool
                tables, self.num_blocks = served_tables(batch, ctx, BS, seed=seed + i)
                self.layouts.append(layout_stats(tables, GROUP_PAGES))
                tables = torch.tensor(tables, dtype=torch.int32, device="cuda")        # [batch, nblk]
            elif pages == "sequential":        # a diagnostic: each sequence's pages in order, back to back
                tables = torch.arange(self.num_blocks, device="cuda", dtype=torch.int32).view(batch, nblk)
            else:                              # a random permutation of the pool: the worst case
                perm = torch.randperm(self.num_blocks, generator=g, device="cuda").to(torch.int32)
                tables = perm.view(batch, nblk).contiguous()
            kc = torch.randn(self.num_blocks, NKV, BS, HD, generator=g, device="cuda", dtype=DT)
            vc = torch.randn(self.num_blocks, NKV, BS, HD, generator=g, device="cuda", dtype=DT)
            q = torch.randn(batch, NH, HD, generator=g, device="cuda", dtype=DT)
            self.sets.append({"kc": kc, "vc": vc, "tables": tables, "q": q})
        self.ctx_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        self.qsl = torch.arange(batch + 1, dtype=torch.int32, device="cuda")

    @property
    def kv_bytes(self) -> int:
        return 2 * self.batch * self.ctx * NKV * HD * DT.itemsize

    def contiguous(self, s):
        """[B, nkv, ctx, hd] K and V gathered from the pages (the gather baseline's work)."""
        t = s["tables"].long()
        k = s["kc"][t].permute(0, 2, 1, 3, 4).reshape(self.batch, NKV, self.ctx, HD)
        v = s["vc"][t].permute(0, 2, 1, 3, 4).reshape(self.batch, NKV, self.ctx, HD)
        return k, v


def sdpa(q, k, v):  # noqa: D103
    return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True).squeeze(2)


def run_ours(case: Case, kernels, partition=None, impl=None, fused_merge=None):
    calls = []
    for s in case.sets:
        def call(s=s):
            return kernels.paged_attention_decode(s["q"], s["kc"], s["vc"], s["tables"], case.ctx_lens, case.qsl,
                                                  HD ** -0.5, case.ctx, partition, impl=impl, fused_merge=fused_merge)
        calls.append(call)
    return calls


def run_sdpa(case: Case, backend):
    from torch.nn.attention import sdpa_kernel
    conts = [case.contiguous(s) for s in case.sets]
    calls = []
    for s, (k, v) in zip(case.sets, conts):
        def call(s=s, k=k, v=v):
            with sdpa_kernel([backend]):
                return sdpa(s["q"], k, v)
        calls.append(call)
    return calls, conts


def run_gather(case: Case):
    calls = []
    for s in case.sets:
        def call(s=s):
            k, v = case.contiguous(s)
            return sdpa(s["q"], k, v)
        calls.append(call)
    return calls


def run_flex(case: Case, compiled):
    """FlexAttention's paged path: pages in its [1, nkv, pages * 16, hd] layout, our page tables."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask, noop_mask
    calls = []
    for s in case.sets:
        pa = PagedAttention(case.num_blocks, BS, case.batch)
        nblk = case.ctx // BS
        pa.page_table[:, :nblk] = s["tables"].long()
        rows = torch.arange(case.batch, device="cuda")[:, None].expand(-1, nblk)
        pa.physical_to_logical[rows, s["tables"].long()] = torch.arange(nblk, device="cuda")[None].expand(case.batch, -1)
        pa.capacity[:] = case.ctx
        kf = s["kc"].permute(1, 0, 2, 3).reshape(1, NKV, case.num_blocks * BS, HD)
        vf = s["vc"].permute(1, 0, 2, 3).reshape(1, NKV, case.num_blocks * BS, HD)
        logical = create_block_mask(noop_mask, case.batch, 1, 1, case.ctx, device="cuda", BLOCK_SIZE=(128, BS))
        mask = pa.convert_logical_block_mask(logical)
        score_mod = pa.get_score_mod(None)
        q4 = s["q"].unsqueeze(2)

        def call(q4=q4, kf=kf, vf=vf, mask=mask, score_mod=score_mod):
            return compiled(q4, kf, vf, block_mask=mask, score_mod=score_mod, enable_gqa=True).squeeze(2)
        calls.append(call)
    return calls


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def probe(b: int, ctx: int) -> None:
    """Run each kernel once (for `ncu -k regex:...`): our decode attention, then cuDNN SDPA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from engine.backends.cuda import CudaKernels
    kernels = CudaKernels()
    case = Case(b, ctx, n_sets=1)
    s = case.sets[0]
    out = run_ours(case, kernels)[0]()
    run_ours(case, kernels, impl="simt")[0]()
    k, v = case.contiguous(s)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        ref = sdpa(s["q"], k, v)
    torch.cuda.synchronize()
    print(f"probe B={b} ctx={ctx} P={kernels.decode_partition_tc(b, NKV, ctx)} err {rel_err(out, ref):.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--partitions", type=int, nargs="*", default=[128, 256, 512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--flex", choices=["none", "some", "all"], default="none",
                    help="FlexAttention points (compiling each shape takes a while): some = the target points")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--pages", choices=["scattered", "served", "sequential"], default="scattered",
                    help="block tables: a random permutation of the pool (the default, the worst case); what the "
                         "engine's allocator hands out on a busy pool (benchmarks/kv_layout.py); or each sequence's "
                         "pages in order (diagnostic)")
    ap.add_argument("--probe", action="store_true",
                    help="one call of ours and of cuDNN SDPA at the first batch/context, for ncu")
    args = ap.parse_args()
    if args.probe:
        return probe(args.batches[0], args.contexts[0])

    from engine.backends.cuda import CudaKernels
    from torch.nn.attention import SDPBackend
    kernels = CudaKernels()
    prop = torch.cuda.get_device_properties(0)
    print(f"# {prop.name}, {prop.multi_processor_count} SMs, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    copy_bw = copy_bandwidth()
    print(f"device-to-device copy: {copy_bw / 1e12:.2f} TB/s (read + write)")
    compiled = None
    if args.flex != "none":
        from torch.nn.attention.flex_attention import flex_attention
        compiled = torch.compile(flex_attention, dynamic=False)
        torch._dynamo.config.cache_size_limit = 64
    flex_points = {(1, 16384), (16, 4096), (64, 16384)}

    rows = []
    for b in args.batches:
        for ctx in args.contexts:
            case = Case(b, ctx, n_sets=rotated_sets(b, ctx), pages=args.pages)
            r = {"batch": b, "ctx": ctx, "mb": case.kv_bytes / 2**20, "sets": case.n_sets}
            if case.layouts:
                r["layout"] = {k: statistics.mean(x[k] for x in case.layouts) for k in case.layouts[0]}
                print(f"B={b} ctx={ctx} pages {args.pages}: pool {case.num_blocks} blocks; a sequence's "
                      f"{r['layout']['blocks']} pages in {r['layout']['runs']:.1f} runs, "
                      f"{r['layout']['switches']:.1f} visits to 2 MB groups (fewest {r['layout']['min_groups']})")
            # ours: each kernel at the heuristic's partition, then a partition sweep of the tensor-core one
            ref = None
            r["p_auto"] = kernels.decode_partition_tc(b, NKV, ctx)
            outs = {}
            for impl in ("simt", "tc"):
                calls = run_ours(case, kernels, impl=impl)
                outs[impl] = calls[0]()
                r[f"{impl}_auto"], _ = timed(calls)
            out = outs["tc"]
            r["ours_auto"] = r["tc_auto"]
            # the tc kernel with the last partition block merging instead of a merge kernel after it
            r["tc_fused_merge"], _ = timed(run_ours(case, kernels, impl="tc", fused_merge=True))
            best = (r["tc_auto"], r["p_auto"])
            sweep = {}
            for p in args.partitions:
                if p > ctx:
                    continue
                t, _ = timed(run_ours(case, kernels, p, impl="tc"))
                sweep[p] = t
                best = min(best, (t, p))
            r["ours"], r["p_best"], r["sweep"] = best[0], best[1], sweep
            # SDPA on contiguous KV, each backend
            r["sdpa"], r["sdpa_be"] = float("inf"), "-"
            for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
                try:
                    calls, conts = run_sdpa(case, be)
                    o = calls[0]()
                    ref = o if ref is None else ref
                    t, _ = timed(calls)
                    r[f"sdpa_{be.name}"] = t
                    if t < r["sdpa"]:
                        r["sdpa"], r["sdpa_be"] = t, be.name.split("_")[0].lower()
                    del calls, conts
                except Exception as exc:  # noqa: BLE001
                    print(f"  SDPA {be.name} at B={b} ctx={ctx}: {type(exc).__name__}: {str(exc)[:160]}")
            # SDPA as a user calls it: torch's own backend choice for these inputs
            try:
                conts = [case.contiguous(s) for s in case.sets]
                r["sdpa_default"], _ = timed([lambda s=s, k=k, v=v: sdpa(s["q"], k, v)
                                              for s, (k, v) in zip(case.sets, conts)])
                del conts
            except Exception as exc:  # noqa: BLE001
                print(f"  SDPA default at B={b} ctx={ctx}: {type(exc).__name__}: {str(exc)[:160]}")
            if ref is not None:
                r["err"] = rel_err(out, ref)
                r["err_simt"] = rel_err(outs["simt"], ref)
            try:
                r["gather"], _ = timed(run_gather(case), min_calls=8, replays=7)
            except Exception as exc:  # noqa: BLE001
                print(f"  gather+SDPA at B={b} ctx={ctx}: {type(exc).__name__}: {str(exc)[:160]}")
            r["flex"] = float("nan")
            if compiled is not None and (args.flex == "all" or (b, ctx) in flex_points):
                try:
                    t0 = time.time()
                    calls = run_flex(case, compiled)
                    o = calls[0]()
                    if ref is not None:
                        r["flex_err"] = rel_err(o, ref)
                    r["flex"], _ = timed(calls)
                    print(f"  flex B={b} ctx={ctx}: compiled and timed in {time.time() - t0:.0f} s, "
                          f"err {r.get('flex_err', float('nan')):.1e}")
                except Exception as exc:  # noqa: BLE001
                    print(f"  FlexAttention paged at B={b} ctx={ctx} failed: {type(exc).__name__}: {str(exc)[:300]}")
            rows.append(r)
            bw = case.kv_bytes / r["ours"]
            print(f"B={b:3d} ctx={ctx:6d}: tc {r['ours'] * 1e6:8.1f} us (P={r['p_best']}, auto P={r['p_auto']} "
                  f"{r['ours_auto'] * 1e6:.1f} us; simt {r['simt_auto'] * 1e6:.1f} us) {bw / 1e12:.2f} TB/s "
                  f"{100 * bw / copy_bw:.0f}% | SDPA "
                  f"{r['sdpa'] * 1e6:.1f} us ({r['sdpa_be']}) | gather {r.get('gather', float('nan')) * 1e6:.1f} us"
                  f" | flex {r['flex'] * 1e6:.1f} us | err vs SDPA {r.get('err', float('nan')):.1e}"
                  f" | sweep {', '.join(f'{p}:{t * 1e6:.1f}' for p, t in sweep.items())}")
            del case
            torch.cuda.empty_cache()

    copy_after = copy_bandwidth()
    print(f"device-to-device copy again: {copy_after / 1e12:.2f} TB/s")
    lines = [f"Copy bandwidth {copy_bw / 1e12:.2f} TB/s (before) / {copy_after / 1e12:.2f} TB/s (after); % copy uses "
             f"the first. Times in us (median of graph replays). Block tables: --pages {args.pages}.", "",
             "| batch | ctx | K+V MB | tc best us (P) | TB/s | % copy | tc auto-P us (P) | simt auto-P us |"
             " SDPA us (backend) | SDPA/tc | SDPA/simt | gather+SDPA us | gather/tc | flex us | flex/tc |"
             " err tc / simt vs SDPA | cuDNN us | flash us | SDPA default us | default / tc auto-P |"
             " tc auto-P, in-kernel merge us |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    nan = float("nan")
    for r in rows:
        bw = r["mb"] * 2**20 / r["ours"]
        g = r.get("gather", float("nan"))
        lines.append(f"| {r['batch']} | {r['ctx']} | {r['mb']:.0f} | {r['ours'] * 1e6:.1f} ({r['p_best']}) | "
                     f"{bw / 1e12:.2f} | {100 * bw / copy_bw:.0f}% | {r['ours_auto'] * 1e6:.1f} ({r['p_auto']}) | "
                     f"{r['simt_auto'] * 1e6:.1f} | {r['sdpa'] * 1e6:.1f} ({r['sdpa_be']}) | "
                     f"{r['sdpa'] / r['ours']:.2f}x | {r['sdpa'] / r['simt_auto']:.2f}x | {g * 1e6:.1f} | "
                     f"{g / r['ours']:.2f}x | {r['flex'] * 1e6:.1f} | {r['flex'] / r['ours']:.2f}x | "
                     f"{r.get('err', float('nan')):.1e} / {r.get('err_simt', float('nan')):.1e} | "
                     f"{r.get('sdpa_CUDNN_ATTENTION', nan) * 1e6:.1f} | {r.get('sdpa_FLASH_ATTENTION', nan) * 1e6:.1f} | "
                     f"{r.get('sdpa_default', nan) * 1e6:.1f} | {r.get('sdpa_default', nan) / r['ours_auto']:.2f}x | "
                     f"{r['tc_fused_merge'] * 1e6:.1f} |")
    lines.append("")
    lines.append("tc partition sweep (us): " + "; ".join(
        f"B={r['batch']} ctx={r['ctx']}: " + ", ".join(f"{p}:{t * 1e6:.1f}" for p, t in r["sweep"].items())
        for r in rows))
    emit(lines, args.out)


if __name__ == "__main__":
    import warnings
    warnings.filterwarnings("ignore", message=".*(kernel not used|runtime disabled|same num_heads).*")
    with torch.inference_mode():
        main()
