"""Does replaying prefill graphs change the Engine's decode speed? (a diagnostic, not a benchmark) The same
CudaBackend with prefill graphs (default) and without (prefill_graph_tokens=0), in turn in one process,
through benchmarks/gpu_e2e.py's engine_run (prompts prefilled, then timed decode steps).
    python3 scripts/prefill_graph_ab.py [--model smollm2] [--batch 128] [--rounds 3]"""
import argparse
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from gpu_e2e import MODELS, engine_run, hf_model, hf_weights

    from engine.backends.cuda import CudaBackend
    cfg = MODELS[args.model]
    backend = CudaBackend(cfg)
    backend.load_weights(hf_weights(hf_model(cfg), cfg))
    default = backend.prefill_graph_tokens
    for _ in range(args.rounds):
        for tokens in (default, 0):
            backend.prefill_graph_tokens = tokens
            backend.reset_graphs()
            r = engine_run(cfg, backend, args.batch, 128, 64)
            print(f"{args.model} B={args.batch} prefill graphs <= {tokens}: {r['tok_s']:,.0f} tok/s, step "
                  f"{r['step_ms']:.2f} ms, ahead {r['ahead']:.0%}, captured {sorted(backend._prefill_graphs)}",
                  flush=True)


if __name__ == "__main__":
    main()
