"""Prefill attention on the GPU, one sequence's chunk of L query tokens at the end of a ctx-token context over
16-token pages: our paged prefill kernels (CUDA cores: simt; tensor cores: tc), the SDPA route CudaBackend
takes for big chunks (prefill_work >= prefill_route_min_work: pages gathered, then
F.scaled_dot_product_attention with a lower-right causal mask), and SDPA on K/V that are already contiguous
(the peer: no gather). "tc" splits the keys into spans when its grid would leave SMs idle (prefill_split:
short chunks on long prefixes); "tc 1 span" is the same kernel without. Times are medians of CUDA event pairs
around single calls (ms); TFLOP/s counts the causal half of 4 x L x ctx x heads x head_dim.

    python3 benchmarks/gpu_prefill.py [--out FILE]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.report import emit  # noqa: E402

BS = 16
SHAPES = {"llama1b": (32, 8, 64), "llama3-8b": (32, 8, 128), "smollm2": (9, 3, 64)}
POINTS = [(64, 64), (128, 128), (256, 256), (512, 512), (1024, 1024), (2048, 2048), (2048, 8192), (8192, 8192),
          (32, 4096), (128, 8192), (512, 8192), (128, 32768)]      # follow-up turns / chunks on a long prefix


def timed(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def case(nh: int, nkv: int, hd: int, L: int, ctx: int, dt=torch.bfloat16):
    """One sequence's chunk: q [L, nh, hd], K/V pools of 16-token pages in a random order (+ 4 spare), its
    block table [1, pages], context [1] and query_start_loc [2] (int32), all on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(L + ctx)
    nblk = -(-ctx // BS)
    kc = torch.randn(nblk + 4, nkv, BS, hd, generator=g, device="cuda", dtype=dt)
    vc = torch.randn(nblk + 4, nkv, BS, hd, generator=g, device="cuda", dtype=dt)
    table = torch.randperm(nblk + 4, generator=g, device="cuda")[:nblk].to(torch.int32)
    q = torch.randn(L, nh, hd, generator=g, device="cuda", dtype=dt)
    ctx_t = torch.tensor([ctx], dtype=torch.int32, device="cuda")
    qsl = torch.tensor([0, L], dtype=torch.int32, device="cuda")
    return q, kc, vc, table[None].contiguous(), ctx_t, qsl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["llama1b", "smollm2", "llama3-8b"], choices=sorted(SHAPES))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from torch.nn.attention.bias import causal_lower_right

    from engine.backends.cuda import CudaKernels, prefill_route_min_work, prefill_work, sdpa_paged_prefill
    from engine.backends.torch_ref import gather_pages
    kernels = CudaKernels()
    dt = torch.bfloat16
    lines = [f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}; "
             f"backend: the path CudaBackend takes (prefill_work against prefill_route_min_work)", "",
             "| model (nh/nkv/hd) | L / ctx | simt ms | tc ms | tc 1 span ms | SDPA route ms | contiguous SDPA ms | "
             "simt / tc | 1 span / tc | route / tc | contiguous / tc | tc TFLOP/s | backend | rel err tc vs route |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model in args.models:
        nh, nkv, hd = SHAPES[model]
        for L, ctx in POINTS:
            q, kc, vc, tables, ctx_t, qsl = case(nh, nkv, hd, L, ctx, dt)
            table = tables[0]
            scale = hd ** -0.5
            k = gather_pages(kc, table.long(), ctx).contiguous()[None]
            v = gather_pages(vc, table.long(), ctx).contiguous()[None]
            mask = None if L == ctx else causal_lower_right(L, ctx)
            qh = q.transpose(0, 1)[None].contiguous()

            def simt():
                return kernels.paged_attention_prefill(q, kc, vc, tables, ctx_t, qsl, scale, L, impl="simt")

            def tc():
                return kernels.paged_attention_prefill(q, kc, vc, tables, ctx_t, qsl, scale, L, impl="tc")

            def one_span():
                return kernels.paged_attention_prefill(q, kc, vc, tables, ctx_t, qsl, scale, L, impl="tc",
                                                       split_keys=0)

            def route():
                return sdpa_paged_prefill(q, kc, vc, table, ctx, scale)

            def contiguous():
                return F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                                      enable_gqa=True)

            reps = 3 if L * ctx >= 1 << 24 else 10
            ts, tt, t1 = timed(simt, reps), timed(tc, reps), timed(one_span, reps)
            try:
                tr, tcont = timed(route, reps), timed(contiguous, reps)
                a, b = tc().float(), route().float()
                err = ((a - b).norm() / a.norm()).item()
            except Exception as exc:  # noqa: BLE001 - a backend without this mask / GQA mix: say so, go on
                print(f"  {model} {L}/{ctx}: SDPA failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                tr = tcont = err = float("nan")
            flop = 4 * nh * hd * (L * ctx - L * (L - 1) / 2)
            path = "route" if prefill_work(L, ctx) >= prefill_route_min_work(nh, hd) else "tc"
            row = (f"| {model} ({nh}/{nkv}/{hd}) | {L} / {ctx} | {ts:.3f} | {tt:.3f} | {t1:.3f} | {tr:.3f} | "
                   f"{tcont:.3f} | {ts / tt:.2f}x | {t1 / tt:.2f}x | {tr / tt:.2f}x | {tcont / tt:.2f}x | "
                   f"{flop / tt / 1e9:.1f} | {path} | {err:.1e} |")
            print(row, flush=True)
            lines.append(row)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
