"""A/B of decode-attention builds (a diagnostic, not a benchmark): the tensor-core kernel of each library
ab/<name>/libpa_cuda.so (scripts/build_ab.sh) at batch 1 / 16 / 64 points, in its own process, with the
last block's merge (fused) and with the merge kernel (mk); times in us, medians of graph replays as in
benchmarks/gpu_attention.py; an output off SDPA's by > 1e-2 is flagged. NAME@S splits each context of
batch >= 16 into S partitions, NAME@tN into a tail of ctx / N tokens after the rest.
    python3 scripts/ab_attention.py base variant base variant

Session 6 used it with builds that skipped the PDL wait, the arrival + merge, or only the merge, to find
what the batch-1 fixed cost is made of (benchmarks/results_cuda.md)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POINTS = [(1, 1024), (1, 4096), (1, 16384), (16, 4096), (16, 16384), (64, 4096), (64, 16384)]


def partition(ctx: int):
    """AB_SPLIT: "S" -> S equal partitions; "tN" -> a tail partition of ctx / N tokens after the rest."""
    spec = os.environ.get("AB_SPLIT", "")
    if not spec:
        return None
    if spec.startswith("t"):
        return ctx - -(-(ctx // int(spec[1:])) // 16) * 16
    return -(-(-(-ctx // int(spec)) // 16)) * 16


def ab_kernels(variant: str):
    """CudaKernels over ab/<variant>/libpa_cuda.so, with the repo and benchmarks/ importable (the A/B
    drivers' children and scripts/stamps_attention.py)."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from engine import native
    native.LIB_DIR = ROOT / "ab" / variant
    from engine.backends.cuda import CudaKernels
    return CudaKernels()


def child(variant: str) -> None:
    k = ab_kernels(variant)
    import gpu_attention as ga
    cells = []
    for b, ctx in POINTS:
        case = ga.Case(b, ctx, n_sets=ga.rotated_sets(b, ctx))
        out = ga.run_ours(case, k, impl="tc")[0]()
        kk, vv = case.contiguous(case.sets[0])
        err = ga.rel_err(out, ga.sdpa(case.sets[0]["q"], kk, vv))
        del kk, vv
        if err > 1e-2:
            cells.append(f"ERR {err:.1e}")
        for fused in (True, False):
            part = partition(ctx) if b >= 16 else None
            t, _ = ga.timed(ga.run_ours(case, k, part, impl="tc", fused_merge=fused))
            cells.append(f"{t * 1e6:.1f}")
        del case
    print("RESULT", variant, " | ".join(cells), flush=True)


def child_cells(script: str, lib: str, env: dict | None = None) -> str:
    """Run `script --child lib` in its own process; its RESULT line's cells, or why it failed."""
    out = subprocess.run([sys.executable, script, "--child", lib], capture_output=True, text=True, env=env)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")), None)
    return line.split(" ", 2)[2] if line else f"failed: {(out.stderr or out.stdout)[-400:]!r}"


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(sys.argv[2])
        sys.exit(0)
    head = " | ".join(f"{b}/{c // 1024}k {m}" for b, c in POINTS for m in ("fused", "mk"))
    print("| variant | " + head + " |")
    for v in sys.argv[1:]:
        lib, _, splits = v.partition("@")
        env = dict(os.environ, AB_SPLIT=splits) if splits else None
        print(f"| {v} | {child_cells(__file__, lib, env)} |", flush=True)
