"""Time to first token on the GPU: one prompt of P tokens through LlamaModel + CudaBackend (bf16) in chunks of
C tokens on the growing prefix (the Engine's max_batched_tokens, 512 by default; "all": one chunk), until the
first token's logits, next to HF transformers' forward over the whole prompt (SDPA attention, bf16,
logits_to_keep=1) on the same random weights, in the same run. Our steps run as the backend chooses
(default: a CUDA graph per (tokens, sequences) bucket up to prefill_graph_tokens, prefill attention on the
tensor-core paged kernel, SDPA over gathered pages for big chunks, which stay eager), without prefill graphs
(eager: every layer launched from Python, the path before session 12), on the CUDA-core kernel (simt: the
path before session 7) and on the SDPA route for every chunk (route). Times are medians of 5 runs after a
first one that captures the graphs (ms, host included: what a request waits for, less tokenization and
sampling).

    python3 benchmarks/gpu_ttft.py [--models smollm2 llama1b] [--prompts 128 512 2048 8192] [--out FILE]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmarks.report import emit  # noqa: E402
from gpu_e2e import BS, MODELS, hf_model, hf_weights  # noqa: E402

from engine.batch import Batch  # noqa: E402
from engine.model import LlamaModel  # noqa: E402

VARIANTS = {"default": {}, "eager": {"prefill_graph_tokens": 0},
            "simt": {"prefill_impl": "simt", "prefill_sdpa_min_work": 1 << 62},
            "route": {"prefill_sdpa_min_work": 1}}


def ttft(model: LlamaModel, prompt: list[int], chunk: int, reps: int = 5) -> float:
    """Median ms to run the prompt's chunks and take the first token (greedy) to the host."""
    table = list(range(-(-len(prompt) // BS)))
    times = []
    for _ in range(reps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for start in range(0, len(prompt), chunk):
            piece = prompt[start:start + chunk]
            last = start + len(piece) == len(prompt)
            logits = model.forward(Batch.build([(piece, start, table)], BS, [last]))
        int(logits.argmax(-1).item())
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[1:])


def hf_ttft(hf, prompt: list[int], reps: int = 5) -> float:
    ids = torch.tensor([prompt], device="cuda")
    times = []
    with torch.inference_mode():
        for _ in range(reps + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits = hf(ids, logits_to_keep=1, use_cache=False).logits
            int(logits[0, -1].argmax().item())
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2", "llama1b"], choices=sorted(MODELS))
    ap.add_argument("--prompts", type=int, nargs="+", default=[128, 512, 2048, 8192])
    ap.add_argument("--chunks", nargs="+", default=["512", "2048", "all"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from engine.backends.cuda import CudaBackend

    lines = [f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}", "",
             "| model | prompt | chunk | " + " | ".join(f"ours {v} ms" for v in VARIANTS) + " | HF ms | HF / ours |",
             "|---|---|---|" + "---|" * len(VARIANTS) + "---|---|"]
    for name in args.models:
        cfg = MODELS[name]
        hf = hf_model(cfg)
        weights = hf_weights(hf, cfg)
        hf = hf.to(torch.bfloat16)
        backend = CudaBackend(cfg)
        backend.load_weights(weights)
        del weights
        gc.collect()
        torch.cuda.empty_cache()
        backend.allocate_kv_cache(-(-max(args.prompts) // BS) + 1, BS)
        model = LlamaModel(cfg, backend)
        defaults = {k: getattr(backend, k) for k in ("prefill_impl", "prefill_sdpa_min_work", "prefill_graph_tokens")}
        g = torch.Generator().manual_seed(0)
        for P in args.prompts:
            prompt = torch.randint(0, cfg.vocab_size, (P,), generator=g).tolist()
            t_hf = hf_ttft(hf, prompt)
            for c in args.chunks:
                chunk = P if c == "all" else int(c)
                if chunk > P:
                    continue
                cells = []
                with torch.inference_mode():
                    for options in VARIANTS.values():
                        for key, value in {**defaults, **options}.items():
                            setattr(backend, key, value)
                        backend.reset_graphs()          # graphs bake in the options above
                        cells.append(ttft(model, prompt, chunk))
                row = (f"| {name} | {P} | {c} | " + " | ".join(f"{t:.2f}" for t in cells) +
                       f" | {t_hf:.2f} | {t_hf / cells[0]:.2f}x |")
                print(row, flush=True)
                lines.append(row)
        del hf, backend, model
        gc.collect()
        torch.cuda.empty_cache()
    emit(lines, args.out)


if __name__ == "__main__":
    main()
