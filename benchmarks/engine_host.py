"""The Engine's own host work per decode step (scheduler, block manager, Batch.build, request bookkeeping),
measured with a backend that does no model work, so what is timed is what the pipelined CUDA engine must
finish while the GPU runs a step (a decode step at batch 128 takes the H200 ~1.4 ms for SmolLM2's size).

The stand-in backend answers every decode step launched ahead (Backend.forward_tokens) with fixed tokens
and every other step with zero logits; nothing else of the model runs. The heap is settled as
engine.decoder.Decoder settles it once a model is loaded (settle_heap: gc.freeze); --no-settle shows
the engine without it.

    python3 benchmarks/engine_host.py [--batches 1 32 128] [--steps 200] [--prompt-len 64] [--profile] [--no-settle]
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.backends.base import Backend, settle_heap  # noqa: E402
from engine.config import EngineConfig, ModelConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.sequence import SamplingParams  # noqa: E402

CFG = ModelConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2,
                  num_kv_heads=1, head_dim=32, rope_theta=10000.0, rms_norm_eps=1e-5,
                  max_position_embeddings=1 << 16, tie_word_embeddings=True, name="host-only")


class NullBackend(Backend):
    """Decode steps that cost nothing: the engine's host work is all that runs."""

    name = "null"
    supports_async = True

    def load_weights(self, weights):
        pass

    def kv_bytes_per_block(self, block_size):
        return 1

    def allocate_kv_cache(self, num_blocks, block_size):
        self.num_blocks, self.block_size = num_blocks, block_size

    def copy_blocks(self, pairs):
        pass

    def forward_step(self, batch):
        return torch.zeros(batch.logits_indices.shape[0], self.config.vocab_size)

    def forward_tokens(self, batch):
        return torch.full((batch.num_seqs,), 7, dtype=torch.int32)

    def _unused(self, *args, **kwargs):
        raise NotImplementedError("NullBackend runs no model")

    embed = rms_norm = linear = rope = write_kv = paged_attention = silu_mul = _unused


def host_ms(batch: int, steps: int, prompt_len: int = 64, profile: bool = False, settle: bool = True) -> float:
    """Host milliseconds per decode step at `batch` sequences, every step launched ahead."""
    bs = 16
    per_seq = -(-(prompt_len + steps + 16) // bs)
    eng = Engine(CFG, NullBackend(CFG), EngineConfig(backend="torch", block_size=bs, num_blocks=batch * per_seq + 8,
                                                     max_num_seqs=batch, max_batched_tokens=max(8192, batch),
                                                     enable_prefix_caching=False))
    if settle:
        settle_heap()
    else:
        gc.unfreeze()                            # as before any settle_heap() of this process
    params = SamplingParams(temperature=0.0, max_tokens=steps + 12, ignore_eos=True)
    for i in range(batch):
        eng.submit([(i * 31 + j) % CFG.vocab_size for j in range(prompt_len)], params)
    eng.step()
    while eng.counters["steps_ahead"] < 3:           # prefill (chunked) and the first pipelined steps
        eng.step()
    start_ahead = eng.counters["steps_ahead"]
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    for _ in range(steps):
        eng.step()
    if prof:
        prof.disable()
    ms = (time.perf_counter() - t0) / steps * 1e3
    assert eng.counters["steps_ahead"] - start_ahead >= steps, "the pipelined decode did not run"
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--prompt-len", type=int, default=64, help="tokens a prompt (the context grows from it)")
    ap.add_argument("--profile", action="store_true", help="cProfile the largest batch's steps")
    ap.add_argument("--no-settle", action="store_true", help="also time the engine without settle_heap()")
    args = ap.parse_args()
    print(f"{args.steps} decode steps a batch, prompts of {args.prompt_len} tokens")
    print("| batch | host ms a decode step | host us a sequence |" + (" without settle_heap ms |" if args.no_settle else ""))
    print("|---|---|---|" + ("---|" if args.no_settle else ""))
    for b in args.batches:
        row = f"| {b} | "
        if args.no_settle:
            raw = host_ms(b, args.steps, args.prompt_len, settle=False)
        ms = host_ms(b, args.steps, args.prompt_len)
        row += f"{ms:.3f} | {ms * 1e3 / b:.1f} |" + (f" {raw:.3f} |" if args.no_settle else "")
        print(row, flush=True)
    if args.profile:
        host_ms(max(args.batches), args.steps, args.prompt_len, profile=True)


if __name__ == "__main__":
    main()
