"""Decode throughput on the GPU: LlamaModel + CudaBackend (bf16, CUDA graphs) next to HF transformers'
generate on the same random weights, for the SmolLM2-135M configuration and a Llama-3.2-1B-like one.

Three ways of counting our steps, all greedy:
  engine-like:   model.forward() -> float32 logits in (pinned) CPU memory -> argmax on the CPU
                 (what Engine + Sampler do today);
  gpu-greedy:    the same forward but argmax on the GPU and only token ids copied back (what HF does);
  gpu-multistep: CudaBackend.greedy_steps: N graph replays that feed their argmax to the next step on
                 the GPU, no host round trip per token (the GPU-bound step time).
Batches are built vectorised (the Batch dataclass directly); Batch.build's own cost is printed apart.

    python3 benchmarks/gpu_e2e.py [--models smollm2 llama1b] [--batches 1 32 128] [--steps 64] [--hf-compile]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.batch import Batch  # noqa: E402
from engine.config import ModelConfig  # noqa: E402
from engine.model import LlamaModel, fuse_weights  # noqa: E402

MODELS = {
    "smollm2": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                           num_kv_heads=3, head_dim=64, rope_theta=100000.0, max_position_embeddings=8192,
                           name="smollm2-135m"),
    "llama1b": ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                           num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
                           max_position_embeddings=131072, name="llama-3.2-1b-like"),
}
BS = 16


def hf_model(cfg: ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM
    hc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                     num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
                     rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
                     tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return LlamaForCausalLM(hc).eval()


class Runner:
    """B sequences with sequential block tables; prefill once, then timed greedy decode steps."""

    def __init__(self, model: LlamaModel, batch: int, prompt_len: int, steps: int):
        self.model, self.B, self.steps = model, batch, steps
        self.per_seq = -(-(prompt_len + steps + 16) // BS)
        model.backend.allocate_kv_cache(batch * self.per_seq + 1, BS)
        self.tables = torch.arange(batch * self.per_seq, dtype=torch.int32).view(batch, self.per_seq)
        g = torch.Generator().manual_seed(batch)
        self.prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g)
        self.ctx = prompt_len

    def prefill(self) -> torch.Tensor:
        items = [(p.tolist(), 0, self.tables[s].tolist()) for s, p in enumerate(self.prompts)]
        logits = self.model.forward(Batch.build(items, BS, [True] * self.B))
        return logits.argmax(-1)

    def decode_batch(self, tokens: torch.Tensor) -> Batch:
        B, pos = self.B, self.ctx
        s = torch.arange(B, dtype=torch.int32)
        return Batch(input_ids=tokens.to(torch.int64), positions=torch.full((B,), pos, dtype=torch.int64),
                     slot_mapping=(s * self.per_seq * BS + pos).to(torch.int32),
                     query_start_loc=torch.arange(B + 1, dtype=torch.int32),
                     context_lens=torch.full((B,), pos + 1, dtype=torch.int32), block_tables=self.tables,
                     logits_indices=torch.arange(B, dtype=torch.int64), max_query_len=1,
                     max_context_len=pos + 1, block_size=BS)

    def step(self, tokens: torch.Tensor, gpu_greedy: bool) -> torch.Tensor:
        batch = self.decode_batch(tokens)
        self.ctx += 1
        if not gpu_greedy:
            return self.model.forward(batch).argmax(-1)
        return forward_gpu_greedy(self.model, batch)

    def run_multistep(self, warmup: int = 4) -> float:
        """tokens / second of backend.greedy_steps from the same start (the replays overwrite the same slots)."""
        batch = self.decode_batch(self.prefill())
        self.model.backend.greedy_steps(batch, warmup)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.model.backend.greedy_steps(batch, self.steps)
        return self.B * self.steps / (time.perf_counter() - t0)

    def run(self, gpu_greedy: bool, warmup: int = 4) -> float:
        """tokens / second over self.steps decode steps (after warm-up steps, which capture the graph)."""
        tokens = self.prefill()
        for _ in range(warmup):
            tokens = self.step(tokens, gpu_greedy)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(self.steps):
            tokens = self.step(tokens, gpu_greedy)
        torch.cuda.synchronize()
        return self.B * self.steps / (time.perf_counter() - t0)


@torch.inference_mode()
def forward_gpu_greedy(model: LlamaModel, batch: Batch) -> torch.Tensor:
    """LlamaModel.forward with the argmax on the GPU: only token ids come back."""
    b = model.backend
    batch = b.prepare(batch)
    h, residual = b.embed(batch.input_ids), None
    for i in range(model.config.num_layers):
        fused = b.forward_layer(i, h, residual, batch)
        h, residual = fused if fused is not None else model.layer(i, h, residual, batch)
    rows = batch.logits_indices
    h, _ = b.rms_norm(h[rows], "norm", residual[rows])
    from engine.backends.cuda import argmax_rows
    return argmax_rows(b.logits_device(h)).cpu()


def profile_steps(runner: Runner, steps: int = 5) -> None:
    """Where a batch-1 decode step's GPU time goes (torch.profiler over a few graph replays)."""
    from torch.profiler import ProfilerActivity, profile
    tokens = runner.prefill()
    for _ in range(3):
        tokens = runner.step(tokens, gpu_greedy=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            tokens = runner.step(tokens, gpu_greedy=True)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    g = next(iter(runner.model.backend._graphs.values()))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        g.graph.replay()
    end.record()
    end.synchronize()
    print(f"graph replay alone: {start.elapsed_time(end) / 20 * 1e3:.1f} us per step (all layers)")


def hf_tok_s(model, batch: int, prompt_len: int, steps: int, **gen) -> float:
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g).cuda()
    mask = torch.ones_like(ids)

    def gen_time(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, **gen)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gen_time(4)                                   # warm-up (and compile, if asked)
        t1 = statistics.median(gen_time(1) for _ in range(2))
        tn = gen_time(steps + 1)
    return batch * steps / (tn - t1)


def batch_build_cost(batch: int, ctx: int) -> float:
    per_seq = -(-ctx // BS)
    items = [([5], ctx - 1, list(range(s * per_seq, (s + 1) * per_seq))) for s in range(batch)]
    t0 = time.perf_counter()
    for _ in range(20):
        Batch.build(items, BS, [True] * batch)
    return (time.perf_counter() - t0) / 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2", "llama1b"], choices=sorted(MODELS))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--hf-steps", type=int, default=32)
    ap.add_argument("--hf-compile", action="store_true", help="also HF static cache + torch.compile, llama1b batch 1")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--profile", action="store_true", help="kernel time table of a few batch-1 decode steps")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from engine.backends.cuda import CudaBackend

    prop = torch.cuda.get_device_properties(0)
    print(f"# {prop.name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    lines = ["| model | batch | ours engine-like tok/s | ours gpu-greedy tok/s | ours gpu-multistep tok/s |"
             " HF generate tok/s | gpu-greedy / HF | Batch.build ms |", "|---|---|---|---|---|---|---|---|"]
    for name in args.models:
        cfg = MODELS[name]
        hf = hf_model(cfg)
        weights = fuse_weights({k: v.detach() for k, v in hf.state_dict().items()}, cfg)
        backend = CudaBackend(cfg)
        backend.load_weights(weights)
        del weights
        hf = hf.to(torch.bfloat16)
        gc.collect()
        torch.cuda.empty_cache()
        params = sum(t.numel() for n, t in backend.w.items() if n != "lm_head" or t is not backend.w["embed"])
        floor = params * 2 / 4.28e12
        print(f"{name}: {params / 1e6:.0f} M parameters, weight bytes / 4.28 TB/s = {floor * 1e3:.3f} ms "
              f"-> batch-1 ceiling {1 / floor:.0f} tok/s")
        model = LlamaModel(cfg, backend)
        for b in args.batches:
            with torch.inference_mode():
                ours = Runner(model, b, args.prompt_len, args.steps).run(gpu_greedy=False)
                ours_gpu = Runner(model, b, args.prompt_len, args.steps).run(gpu_greedy=True)
                ours_ms = Runner(model, b, args.prompt_len, args.steps).run_multistep()
                if args.profile and b == 1:
                    profile_steps(Runner(model, b, args.prompt_len, args.steps))
            hf_ts = float("nan") if args.no_hf else hf_tok_s(hf, b, args.prompt_len, args.hf_steps)
            build = batch_build_cost(b, args.prompt_len + args.steps)
            print(f"{name} B={b}: ours {ours:,.0f} tok/s engine-like, {ours_gpu:,.0f} tok/s gpu-greedy, "
                  f"{ours_ms:,.0f} tok/s gpu-multistep | HF {hf_ts:,.0f} tok/s | Batch.build {build * 1e3:.2f} ms",
                  flush=True)
            lines.append(f"| {name} | {b} | {ours:,.0f} | {ours_gpu:,.0f} | {ours_ms:,.0f} | {hf_ts:,.0f} | "
                         f"{ours_gpu / hf_ts:.1f}x | {build * 1e3:.2f} |")
        if args.hf_compile and name == "llama1b":
            try:
                hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
                t = hf_tok_s(hf, 1, args.prompt_len, args.hf_steps, cache_implementation="static")
                print(f"{name} B=1 HF static cache + torch.compile: {t:,.0f} tok/s")
                lines.append(f"| {name} (HF static+compile) | 1 | | | | {t:,.0f} | | |")
            except Exception as exc:  # noqa: BLE001
                print(f"HF static cache + torch.compile failed: {type(exc).__name__}: {str(exc)[:300]}")
        del model, backend, hf
        gc.collect()
        torch.cuda.empty_cache()
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
