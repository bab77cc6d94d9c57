"""Serving on the GPU without a web server: the Engine over CudaBackend (random weights, bf16) stepped on this
thread while multi-turn chats arrive. Chats start as a Poisson process (--rate a second); each turn is a new
user message on the conversation so far (history + answers, so prefix caching keeps the history's pages and
a follow-up turn is a short chunk on a long prefix), sent when the previous answer has finished. Per variant:
time to first token (p50 / p99, first turns and follow-ups apart), inter-token latency (p50 / p99 over every
token's gap, what a streaming client sees), generated tok/s, steps, the engine's start-up warm-up (seconds,
graphs) and the graphs captured while serving. Variants: "default" (every graph captured at start-up,
Engine(warmup=True)), "lazy capture" (warmup=False: each graph captured by the first step of its shape),
"eager prefill" (prefill_graph_tokens=0: prefill and mixed steps launched layer by layer), "one span" (prefill
keys never split). Each variant runs two workloads of the same shape (seeds 1 and 2), each on a new Engine.

    python3 benchmarks/gpu_serve.py [--model smollm2] [--chats 48] [--turns 4] [--rate 16] [--sampled] [--out FILE]
    python3 benchmarks/gpu_serve.py --backend ref --model tiny --chats 3 --turns 2   # CPU smoke run
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import queue
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmarks.report import emit  # noqa: E402
from gpu_e2e import BS, MODELS  # noqa: E402

from engine.config import EngineConfig, ModelConfig  # noqa: E402
from engine.sequence import SamplingParams  # noqa: E402

TINY = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=16, rope_theta=10000.0, max_position_embeddings=4096, name="tiny")
VARIANTS = {"default": {}, "lazy capture": {"warmup": False}, "eager prefill": {"graphs": False},
            "one span": {"split": False}, "eager, one span": {"graphs": False, "split": False}}
DEFAULT_VARIANTS = ["default", "lazy capture", "eager prefill"]


@dataclasses.dataclass
class Turn:
    chat: int
    index: int
    user: list[int]          # this turn's new message
    answer_len: int


@dataclasses.dataclass
class Live:
    turn: Turn
    handle: object
    sent: float
    history: list[int]
    last: float | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)


def workload(args, vocab: int, seed: int) -> tuple[list[float], list[list[Turn]]]:
    """Chat start times and each chat's turns: a first message of --first tokens (+-50 %), follow-ups of
    --follow (+-50 %), answers of --answer tokens."""
    rng = random.Random(seed)
    starts, t = [], 0.0
    for _ in range(args.chats):
        t += rng.expovariate(args.rate)
        starts.append(t)

    def msg(n: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(max(1, int(n * rng.uniform(0.5, 1.5))))]
    chats = [[Turn(c, k, msg(args.first if k == 0 else args.follow), args.answer) for k in range(args.turns)]
             for c in range(args.chats)]
    return starts, chats


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(q / 100 * len(v)))]


def serve(engine, starts: list[float], chats: list[list[Turn]], sampling: dict | None = None) -> dict:
    """Step the engine until every chat's every turn is answered; latencies in ms. sampling: the turns'
    SamplingParams besides greedy (each turn seeded by its chat and turn)."""
    ready = sorted((s, c, 0, []) for c, s in enumerate(starts))      # (time, chat, turn, history)
    live: list[Live] = []
    ttft = {"first": [], "follow": []}
    gaps: list[float] = []
    generated, steps = 0, 0
    t0 = time.monotonic()
    while ready or live:
        now = time.monotonic() - t0
        while ready and ready[0][0] <= now:
            _, c, k, history = ready.pop(0)
            turn = chats[c][k]
            prompt = history + turn.user
            params = SamplingParams(**(sampling or {"temperature": 0.0}), seed=1000 * c + k if sampling else None,
                                    max_tokens=turn.answer_len, ignore_eos=True)
            live.append(Live(turn, engine.submit(prompt, params), now, prompt))
        if not engine.has_work():
            if ready:
                time.sleep(max(0.0, min(ready[0][0] - now, 0.01)))
            continue
        engine.step()
        steps += 1
        now = time.monotonic() - t0
        for item in list(live):
            while True:
                try:
                    out = item.handle.get(timeout=0)
                except queue.Empty:
                    break
                if out.token_ids:
                    if item.last is None:
                        ttft["first" if item.turn.index == 0 else "follow"].append((now - item.sent) * 1e3)
                    else:
                        gaps += [(now - item.last) * 1e3 / len(out.token_ids)] * len(out.token_ids)
                    item.last = now
                    item.tokens += out.token_ids
                    generated += len(out.token_ids)
                if out.finished:
                    live.remove(item)
                    nxt = item.turn.index + 1
                    if nxt < len(chats[item.turn.chat]):
                        ready.append((now, item.turn.chat, nxt, item.history + item.tokens))
                        ready.sort(key=lambda r: r[0])
                    break
    seconds = time.monotonic() - t0
    return {"ttft_first": ttft["first"], "ttft_follow": ttft["follow"], "gaps": gaps, "tok_s": generated / seconds,
            "seconds": seconds, "steps": steps}


def make_backend(args, cfg: ModelConfig):
    """CudaBackend on gpu_e2e's seeded random weights, or (a CPU smoke run) torch_ref on the same init."""
    from gpu_e2e import hf_model, hf_weights
    if args.backend == "ref":
        from engine.backends.torch_ref import TorchRefBackend
        backend = TorchRefBackend(cfg)
        backend.load_weights(hf_weights(hf_model(cfg, "cpu"), cfg))
        return backend
    from engine.backends.cuda import CudaBackend
    backend = CudaBackend(cfg)
    backend.load_weights(hf_weights(hf_model(cfg), cfg))
    gc.collect()
    torch.cuda.empty_cache()
    return backend


def graph_count(backend) -> int:
    return len(getattr(backend, "_graphs", {})) + len(getattr(backend, "_prefill_graphs", {}))


def set_variant(backend, options: dict, defaults: dict) -> None:
    """Switch prefill graphs and split keys on or off (CUDA only); drops captured graphs."""
    if not hasattr(backend, "reset_graphs"):
        return
    backend.prefill_graph_tokens = defaults["tokens"] if options.get("graphs", True) else 0
    backend.kernels.prefill_split = defaults["split"] if options.get("split", True) else (lambda *a, **k: 0)
    backend.reset_graphs()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS) + ["tiny"])
    ap.add_argument("--backend", default="cuda", choices=["cuda", "ref"])
    ap.add_argument("--chats", type=int, default=48)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--rate", type=float, default=16.0, help="chats starting a second")
    ap.add_argument("--first", type=int, default=600, help="tokens of a chat's first message (+-50 %%)")
    ap.add_argument("--follow", type=int, default=60, help="tokens of a follow-up message (+-50 %%)")
    ap.add_argument("--answer", type=int, default=96, help="tokens of each answer")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    ap.add_argument("--sampled", action="store_true",
                    help="answers sampled as the chat page asks (temperature 0.7, top_p 0.95), not greedy")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from engine.engine import Engine

    cfg = TINY if args.model == "tiny" else MODELS[args.model]
    backend = make_backend(args, cfg)
    defaults = {"tokens": getattr(backend, "prefill_graph_tokens", 0),
                "split": getattr(getattr(backend, "kernels", None), "prefill_split", None)}
    longest = args.turns * (int(args.first * 1.5) + int(args.follow * 1.5) + args.answer) + 2 * BS
    per_chat = -(-longest // BS)
    name = torch.cuda.get_device_name(0) if args.backend == "cuda" else "CPU (torch_ref)"
    lines = [f"# {name}, {cfg.name}, {time.strftime('%Y-%m-%d %H:%M')}: {args.chats} chats x {args.turns} turns, "
             f"{args.rate:g} chats/s, first message ~{args.first} tokens, follow-ups ~{args.follow}, answers "
             f"{args.answer}; max_num_seqs {args.max_num_seqs}"
             + ("; sampled (T=0.7, top_p 0.95)" if args.sampled else ""), "",
             "| variant | workload | TTFT first p50 / p99 ms | TTFT follow-up p50 / p99 ms | ITL p50 / p99 ms | "
             "tok/s | steps | seconds | warm-up s (graphs) | graphs captured serving |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for v in args.variants:
        set_variant(backend, VARIANTS[v], defaults)
        for seed in (1, 2):
            engine = Engine(cfg, backend, EngineConfig(backend="cuda" if args.backend == "cuda" else "torch",
                                                       block_size=BS, num_blocks=args.chats * per_chat + 8,
                                                       max_num_seqs=args.max_num_seqs, enable_prefix_caching=True,
                                                       warmup=VARIANTS[v].get("warmup", True)))
            before = graph_count(backend)
            starts, chats = workload(args, cfg.vocab_size, seed)
            r = serve(engine, starts, chats, {"temperature": 0.7, "top_p": 0.95} if args.sampled else None)
            captured = graph_count(backend) - before
            row = (f"| {v} | {seed} | {pct(r['ttft_first'], 50):.1f} / {pct(r['ttft_first'], 99):.1f} | "
                   f"{pct(r['ttft_follow'], 50):.1f} / {pct(r['ttft_follow'], 99):.1f} | "
                   f"{pct(r['gaps'], 50):.2f} / {pct(r['gaps'], 99):.2f} | {r['tok_s']:,.0f} | {r['steps']} | "
                   f"{r['seconds']:.1f} | {engine.warmup_s:.1f} ({engine.warmup_shapes}) | {captured} |")
            del engine
            print(row, flush=True)
            lines.append(row)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
