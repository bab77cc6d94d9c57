"""INT8 CPU kernels: our GEMM vs oneDNN vs torch fp32 on SmolLM2's shapes, and the forward pass.

    .venv/bin/python benchmarks/cpu_kernels.py [--install-onednn] [--write benchmarks/results_cpu.md]

oneDNN: the `onednn` wheel in requirements.txt is a SYCL-runtime build (its CPU engine needs an OpenCL
device and then runs only the reference int8 matmul), so this script uses `onednn-cpu-gomp` (a CPU
build on GNU OpenMP, as ours) from a private prefix, .venv/onednn-cpu-gomp; --install-onednn puts it
there with pip. Weights are cycled through enough copies to exceed the 32 MiB L3, as in a forward
pass, so M = 1 measures the memory stream, not the cache. Times are medians; the cores are shared.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.backends.cpu_int8 import CpuInt8Backend, load_cpu_lib  # noqa: E402
from engine.batch import Batch  # noqa: E402
from engine.model import LlamaModel, fuse_weights  # noqa: E402
from engine.weights import quantize_int8  # noqa: E402

ONEDNN_PREFIX = ROOT / ".venv" / "onednn-cpu-gomp"
ONEDNN_PKGS = ["onednn-cpu-gomp==2023.2.0"]
# (label, N, K): the model's matrices (qkv is q, k, v stacked; 192 is k or v alone)
SHAPES = [("o 576x576", 576, 576), ("k/v 192x576", 192, 576), ("qkv 960x576", 960, 576),
          ("gate_up 3072x576", 3072, 576), ("down 576x1536", 576, 1536), ("lm_head 49152x576", 49152, 576)]
MS = [1, 8, 32]
L3_BYTES = 32 << 20


def onednn_handle(nl, install: bool):
    """(handle, description) or (None, reason)."""
    lib = ONEDNN_PREFIX / "lib" / "libdnnl.so.3"
    if not lib.exists() and install:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--prefix",
                        str(ONEDNN_PREFIX), *ONEDNN_PKGS], check=True)
    if not lib.exists():
        return None, f"{lib} missing (run with --install-onednn)"
    h = nl.ffi.new("pa_onednn_cpu **")
    status = nl.lib.pa_onednn_open_cpu(h, str(lib).encode())
    if status:
        return None, nl.ffi.string(nl.lib.pa_last_error_cpu()).decode()
    return h[0], str(lib)


def timed(fn, reps: int, warmup: int = 1) -> float:
    time.sleep(0.1)                   # torch's OpenMP team spins up to ~30 ms after its last parallel op
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copies_for(nbytes: int) -> int:
    return max(1, -(-2 * L3_BYTES // nbytes))


def kernel_table(nl, dnnl) -> list[dict]:
    """Each implementation in its own pass over all shapes: an OpenMP team (torch's, oneDNN's) keeps
    spinning for a while after its calls and would take a core from the next one measured."""
    handle = nl.ffi.new("pa_pool_cpu **")
    nl.check(nl.lib.pa_pool_create_cpu(handle, nl.lib.pa_num_threads_cpu()), "pool_create")
    pool = nl.ffi.gc(handle[0], nl.lib.pa_pool_destroy_cpu)            # as the backend runs it
    cases = []
    for label, n, k in SHAPES:
        torch.manual_seed(n + k)
        w = torch.randn(n, k) * 0.05
        q, s = quantize_int8(w)
        pc_s = w.abs().amax(1) / 127
        pc_q = torch.round(w / pc_s[:, None]).to(torch.int8)
        cases.append((label, n, k, w, q, s, pc_q, pc_s))

    def measure(kind: str) -> dict:
        out = {}
        for label, n, k, w, q, s, pc_q, pc_s in cases:
            if kind == "ours":
                weights = [(q.clone(), s.clone()) for _ in range(copies_for(q.numel() + s.numel() * 4))]
            elif kind == "onednn":
                weights = [(pc_q.clone(), pc_s.clone()) for _ in range(copies_for(q.numel()))]
            else:
                weights = [w.clone() for _ in range(copies_for(w.numel() * 4))]
            for m in MS:
                x, y = torch.randn(m, k), torch.empty(m, n)
                scratch = torch.empty(m * k + 64 + m * (k // 32) * 4 + 4 * m, dtype=torch.uint8)
                sp, xp, yp = nl.ptr(scratch, "void *"), nl.ptr(x, "float *"), nl.ptr(y, "float *")
                it = iter(range(10**9))

                def run():
                    wt = weights[next(it) % len(weights)]
                    if kind == "torch":
                        torch.matmul(x, wt.T, out=y)
                        return
                    qp, scp = nl.ptr(wt[0], "int8_t *"), nl.ptr(wt[1], "float *")
                    if kind == "ours":
                        nl.check(nl.lib.pa_linear_q8_cpu(pool, yp, sp, scratch.numel(), xp, qp, scp, m, n, k), kind)
                    else:
                        nl.check(nl.lib.pa_linear_onednn_cpu(yp, dnnl, sp, scratch.numel(), xp, qp, scp, m, n, k),
                                 kind)

                # 32 warm-up calls: past the pool's solo spell if a torch op above made it stall
                out[(label, m)] = timed(run, 15 if n * k > 10**7 else 60, warmup=32 if kind == "ours" else 1)
            del weights
        time.sleep(0.2)                      # let spinning teams go to sleep before the next pass
        return out

    ours = measure("ours")
    onednn = measure("onednn") if dnnl is not None else {}
    fp32 = measure("torch")
    rows = [{"shape": label, "m": m, "ours": ours[(label, m)], "onednn": onednn.get((label, m)),
             "torch": fp32[(label, m)]} for label, _, _, *_ in cases for m in MS]
    for row in rows:
        print(format_row(row), flush=True)
    stalls, solo = nl.ffi.new("int64_t *"), nl.ffi.new("int64_t *")
    nl.check(nl.lib.pa_pool_stats_cpu(stalls, solo, pool), "pool_stats")
    print(f"(our pool during the table: {stalls[0]} stalls, {solo[0]} solo calls)")
    return rows


def format_row(r: dict) -> str:
    dn = f"{r['onednn'] * 1e3:8.3f}" if r["onednn"] is not None else "       -"
    ratio = f"{r['onednn'] / r['ours']:6.2f}x" if r["onednn"] is not None else "      -"
    return (f"| {r['shape']:<18} | {r['m']:>3} | {r['ours'] * 1e3:8.3f} | {dn} | {r['torch'] * 1e3:8.3f} | "
            f"{ratio} | {r['torch'] / r['ours']:6.2f}x |")


TABLE_HEAD = ("| shape (N x K)      |   M | ours ms  | oneDNN ms| torch ms | oneDNN/ours | torch/ours |\n"
              "|--------------------|-----|----------|----------|----------|-------------|------------|")


def forward_figures() -> list[str]:
    """ms per step of LlamaModel + Batch on the real model: decode at batch 1/8/32 (context 128), prefill 512."""
    import gc
    import resource

    from engine.weights import load_model
    base_rss = int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmRSS"))) * 1024
    loaded = load_model()
    cfg = loaded.config
    backend = CpuInt8Backend(cfg)
    backend.load_weights(fuse_weights(loaded.tensors, cfg))
    del loaded
    gc.collect()
    bs = 16
    backend.allocate_kv_cache(2048, bs)
    model = LlamaModel(cfg, backend)
    lines = ["| forward (LlamaModel + Batch) | ms / step | tok/s | pool stalls / solo calls so far |",
             "|---|---|---|---|"]

    def stats(b):
        stalls, solo = b.pool_stats()
        return f"{stalls} / {solo}"

    def tables(nseq, ctx):
        per = (ctx + 1 + bs - 1) // bs + 1
        return [list(range(1 + s * per, 1 + (s + 1) * per)) for s in range(nseq)]

    prompt = list(range(100, 612))
    t = tables(1, 512)
    prefill = Batch.build([(prompt, 0, t[0])], bs, [True])
    sec = timed(lambda: model.forward(prefill), 3)
    lines.append(f"| prefill 512 tokens | {sec * 1e3:8.1f} | {512 / sec:7.0f} | {stats(backend)} |")
    for nseq in (1, 8, 32):
        t = tables(nseq, 128)
        model.forward(Batch.build([(prompt[:128], 0, tb) for tb in t], bs, [True] * nseq))
        step = Batch.build([([7], 128, tb) for tb in t], bs, [True] * nseq)
        sec = timed(lambda: model.forward(step), 30)
        lines.append(f"| decode batch {nseq:<2} (context 128) | {sec * 1e3:8.2f} | {nseq / sec:7.0f} | "
                     f"{stats(backend)} |")
    kv_bytes = backend.kv_bytes_per_block(bs) * 2048
    rss = int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmRSS"))) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    w_bytes = backend.weight_bytes()
    lines += ["", f"memory: int8 weights + scales + norms {w_bytes / 2**20:.1f} MiB, KV pool (2048 blocks of 16) "
              f"{kv_bytes / 2**20:.1f} MiB; RSS after loading and these steps {rss / 2**20:.1f} MiB = "
              f"{rss / (w_bytes + kv_bytes):.2f}x of their sum, {(rss - base_rss) / (w_bytes + kv_bytes):.2f}x "
              f"without the {base_rss / 2**20:.0f} MiB the interpreter + torch held before loading "
              f"(peak during the GGUF -> float32 -> int8 load {peak / 2**20:.0f} MiB)"]
    for line in lines:
        print(line, flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--install-onednn", action="store_true", help=f"pip install {ONEDNN_PKGS} into {ONEDNN_PREFIX}")
    ap.add_argument("--write", type=Path, help="write the tables as markdown to this file")
    ap.add_argument("--skip-forward", action="store_true")
    ap.add_argument("--forward-only", action="store_true")
    args = ap.parse_args()
    nl = load_cpu_lib()
    dnnl, where = onednn_handle(nl, args.install_onednn)
    print(f"threads: {nl.lib.pa_num_threads_cpu()}  OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    print(f"oneDNN: {where}")
    fwd = [] if args.skip_forward else forward_figures()      # first: its RSS is the model's alone
    if args.forward_only:
        return
    print(f"load average {os.getloadavg()[0]:.2f}")
    if not args.skip_forward:                                  # the web server sets OMP_WAIT_POLICY=PASSIVE
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        out = subprocess.run([sys.executable, __file__, "--forward-only"], env=env, capture_output=True, text=True,
                             check=True).stdout
        fwd += ["", "with OMP_WAIT_POLICY=PASSIVE (as webapp/serve.py and wsgi.py set it):", "",
                *[line for line in out.splitlines() if line.startswith("|")]]
        print("\n".join(fwd[-6:]))
    print(TABLE_HEAD)
    rows = kernel_table(nl, dnnl)
    impl = ""
    if dnnl is not None:
        buf = nl.ffi.new("char[128]")
        nl.lib.pa_onednn_impl_cpu(buf, 128, dnnl)
        impl = nl.ffi.string(buf).decode()
        print(f"oneDNN implementation: {impl}")
    if args.write:
        write_tables(args.write, [*fwd, "", f"oneDNN: {where} ({impl})", "", TABLE_HEAD, *map(format_row, rows)])


def write_tables(path: Path, lines: list[str]) -> None:
    """Replace the text between the TABLES markers of path (or write the file when it has none)."""
    begin, end = "<!-- TABLES_BEGIN (benchmarks/cpu_kernels.py --write) -->", "<!-- TABLES_END -->"
    body = "\n".join([begin, *lines, end])
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        body = old[:old.index(begin)] + body + old[old.index(end) + len(end):]
    path.write_text(body + ("" if body.endswith("\n") else "\n"))


if __name__ == "__main__":
    main()
