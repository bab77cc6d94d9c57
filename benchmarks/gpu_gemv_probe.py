"""One launch of each batch-1 GEMV shape of the Llama-3.2-1B-like layer, for `ncu` (what a GEMV's ~2.5 us
beyond its bytes / bandwidth is: DRAM throughput over the kernel, stall reasons, occupancy).

    ncu --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \\
        --section Occupancy -k regex:gemv --launch-skip 4 --launch-count 4 python3 benchmarks/gpu_gemv_probe.py
"""
from __future__ import annotations

import torch

from engine.backends.cuda import GEMV_NORM_SILU, GEMV_PLAIN, CudaKernels


def main() -> None:
    kn = CudaKernels()
    g = torch.Generator(device="cuda").manual_seed(0)
    bf = dict(dtype=torch.bfloat16, device="cuda")

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, device="cuda") * 0.02).to(torch.bfloat16)

    x, nw = rnd(1, 2048), torch.ones(2048, **bf)
    act = rnd(1, 8192)
    shapes = [("qkv", lambda w: kn.gemv(x, w, 1, nw), rnd(3072, 2048)),       # GEMV_NORM
              ("o", lambda w: kn.gemv(x, w, GEMV_PLAIN, residual=x), rnd(2048, 2048)),
              ("gate_up", lambda w: kn.gemv(x, w, GEMV_NORM_SILU, nw), rnd(16384, 2048)),
              ("down", lambda w: kn.gemv(act, w, GEMV_PLAIN, residual=x), rnd(2048, 8192))]
    for _, call, w in shapes:          # warm-up: the first launch of each instantiation sets its smem limit
        call(w)
    torch.cuda.synchronize()
    for name, call, w in shapes:       # the launches ncu captures (--launch-skip 4)
        call(w)
        torch.cuda.synchronize()
        print(f"probe: {name} {tuple(w.shape)}", flush=True)


if __name__ == "__main__":
    main()
