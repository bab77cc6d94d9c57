"""Host profile of eager prefill chunks (a diagnostic): LlamaModel + CudaBackend on the SmolLM2 configuration
with random weights, N forward calls of a C-token chunk on a growing prefix under cProfile; prints the GPU-
synchronised ms a chunk, the ms a chunk with the host alone (torch.cuda.synchronize skipped until the end),
and the top functions by own time.
    python3 scripts/profile_prefill.py [--chunk 512] [--chunks 8]
"""
import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    args = ap.parse_args()
    from gpu_e2e import BS, MODELS, hf_model, hf_weights

    from engine.backends.cuda import CudaBackend
    from engine.batch import Batch
    from engine.model import LlamaModel
    cfg = MODELS[args.model]
    backend = CudaBackend(cfg)
    backend.load_weights(hf_weights(hf_model(cfg), cfg))
    n = args.chunk * args.chunks
    backend.allocate_kv_cache(-(-n // BS) + 1, BS)
    model = LlamaModel(cfg, backend)
    table = list(range(-(-n // BS)))
    prompt = torch.randint(0, cfg.vocab_size, (n,)).tolist()

    def run(sync: bool) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for start in range(0, n, args.chunk):
            model.forward(Batch.build([(prompt[start:start + args.chunk], start, table)], BS, [True]))
            if sync:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3 / args.chunks

    with torch.inference_mode():
        run(True)
        print(f"{args.model}: {args.chunk}-token chunks, ms a chunk: synchronised {run(True):.2f}, "
              f"host-paced {run(False):.2f}")
        prof = cProfile.Profile()
        prof.enable()
        run(False)
        prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
