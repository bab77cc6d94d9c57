"""A/B of prefill-attention builds (a diagnostic, not a benchmark): the tensor-core prefill kernel of each
library ab/<name>/libpa_cuda.so (AB_SOURCES=prefill_attention_tc bash scripts/build_ab.sh NAME -D...), one
sequence's chunk at the points below, in its own process; ms, median of 7 event pairs around 4 calls
each; an output off SDPA's on contiguous K/V by > 2e-2 is flagged.
    python3 scripts/ab_prefill.py base variant ...
"""
import statistics
import sys

MODELS = ["llama1b", "llama3-8b", "smollm2"]
POINTS = [(512, 512), (1024, 1024), (2048, 2048), (2048, 8192), (8192, 8192)]


def child(variant: str) -> None:
    from ab_attention import ab_kernels
    kernels = ab_kernels(variant)
    import gpu_prefill as gp
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    from engine.backends.torch_ref import gather_pages
    cells = []
    for model in MODELS:
        nh, nkv, hd = gp.SHAPES[model]
        for L, ctx in POINTS:
            q, kc, vc, tables, ctx_t, qsl = gp.case(nh, nkv, hd, L, ctx)
            scale = hd ** -0.5

            def run():
                return kernels.paged_attention_prefill(q, kc, vc, tables, ctx_t, qsl, scale, L, impl="tc")

            k = gather_pages(kc, tables[0].long(), ctx)[None]
            v = gather_pages(vc, tables[0].long(), ctx)[None]
            mask = None if L == ctx else causal_lower_right(L, ctx)
            ref = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, attn_mask=mask, is_causal=mask is None,
                                                 scale=scale, enable_gqa=True)[0].transpose(0, 1).float()
            out = run().float()
            err = ((out - ref).norm() / ref.norm()).item()
            run()
            torch.cuda.synchronize()
            times = []
            for _ in range(7):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(4):
                    run()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 4)
            t = statistics.median(times)
            flop = 4 * nh * hd * (L * ctx - L * (L - 1) / 2)
            cells.append(f"{t:.3f} ({flop / t / 1e9:.0f})" + (f" ERR {err:.1e}" if err > 2e-2 else ""))
    print("RESULT", variant, " | ".join(cells), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(sys.argv[2])
        sys.exit(0)
    head = " | ".join(f"{m} {L}/{c}" for m in MODELS for L, c in POINTS)
    print(f"| build | {head} |  (ms (TFLOP/s))")
    print("|---" * (1 + len(MODELS) * len(POINTS)) + "|")
    from ab_attention import child_cells       # scripts/ is on sys.path when this script runs
    for name in sys.argv[1:]:
        print(f"| {name} | {child_cells(__file__, name)} |", flush=True)
