"""Decode throughput on the GPU: LlamaModel + CudaBackend (bf16, CUDA graphs) next to HF transformers'
generate on the same random weights, for the SmolLM2-135M configuration and a Llama-3.2-1B-like one.

Three ways of counting our steps, all greedy:
  Engine:        the team's engine.engine.Engine (scheduler, block manager, Batch.build, Sampler) over
                 CudaBackend, stepped on this thread; decode steps replay a whole-step CUDA graph through
                 Backend.forward_step; pipelined (the default: each step launched from the previous step's
                 argmax on the GPU before the host reads it) and synchronous (argmax read every step);
  forward:       LlamaModel.forward (same graph) + argmax on the GPU, only token ids copied back (what HF
                 does), batches built vectorised (the Batch dataclass directly);
  gpu-multistep: CudaBackend.greedy_steps: N graph replays that feed their argmax to the next step on
                 the GPU, no host round trip per token (the GPU-bound step time).
Steps of <= 8 rows (the GEMV path) run in variants (--variants): default (the backend's choice); layers
(every layer in one persistent launch, pa_decode_layers_cuda); base; pdl (GEMVs as programmatic dependent
launches); fuse (SiLU-mul in gate_up's epilogue, down a plain GEMV); tokens joined by "+" change one
setting of the first: pdl / nopdl / pdl:o/gate_up (PDL for those GEMVs only), fuse, tc / simt (decode
attention kernel), kmerge (split attention merged by a merge kernel in the decode graphs too, not by the
last partition's block), deep:down/o (those GEMVs with PA_CUDA_GEMV_DEEP), nodeep, logits (the pipelined
Engine's steps through the logits graph + Backend.argmax instead of Backend.forward_tokens), e.g.
default+pdl:o/gate_up.
Batch.build's own cost is printed apart; --gemv times each GEMV shape of the 1B-like model alone.

--sampled adds sampled requests (SAMPLED settings): the Engine (its sampled rows through the CUDA backend's
fused kernel, pa_sample_rows_cuda, inside the decode graph since session 16) next to the same Engine
without the sampled graph (session 15: the logits graph, then the kernel), with session 14's torch-path sampler
(engine.sampler.sample_rows: a row sort and ~20 launches) and HF generate(do_sample=True) on the same
weights; --one-row adds the one-row host sampler both replaced (slow: up to 1.7 s a step); --logprobs adds
requests asking for 5 logprobs a token.

    python3 benchmarks/gpu_e2e.py [--models smollm2 llama1b] [--batches 1 32 128] [--steps 64] [--no-hf] [--sampled [--one-row] [--logprobs]]
    python3 benchmarks/gpu_e2e.py --graph-ab 5 --no-hf --steps 256 [--ab-other oneblock]   (the sampled graph, A/B)
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

from benchmarks.report import emit  # noqa: E402
from engine.batch import Batch  # noqa: E402
from engine.config import ModelConfig  # noqa: E402
from engine.model import LlamaModel, fuse_weights  # noqa: E402
from engine.sampler import Sampler  # noqa: E402

MODELS = {
    "smollm2": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                           num_kv_heads=3, head_dim=64, rope_theta=100000.0, max_position_embeddings=8192,
                           name="smollm2-135m"),
    "llama1b": ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                           num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
                           max_position_embeddings=131072, name="llama-3.2-1b-like"),
}
BS = 16


def hf_model(cfg: ModelConfig, device: str = "cuda"):
    """HF's LlamaForCausalLM with cfg's shapes and its own seeded random init (the same weights every run)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    hc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                     num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
                     rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
                     tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(hc).eval()


def hf_weights(hf, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The HF model's weights in our fused layout (engine.model.fuse_weights)."""
    return fuse_weights({k: v.detach() for k, v in hf.state_dict().items()}, cfg)


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
        return logits.argmax(-1).cpu()                  # forward's logits live on the GPU

    def decode_batch(self, tokens: torch.Tensor) -> Batch:
        B, pos = self.B, self.ctx
        s = torch.arange(B, dtype=torch.int32)
        return Batch(input_ids=tokens.to(torch.int64), positions=torch.full((B,), pos, dtype=torch.int64),
                     slot_mapping=(s * self.per_seq * BS + pos).to(torch.int32),
                     query_start_loc=torch.arange(B + 1, dtype=torch.int32),
                     context_lens=torch.full((B,), pos + 1, dtype=torch.int32), block_tables=self.tables,
                     logits_indices=torch.arange(B, dtype=torch.int64), max_query_len=1,
                     max_context_len=pos + 1, block_size=BS)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        batch = self.decode_batch(tokens)
        self.ctx += 1
        return argmax_rows(self.model.forward(batch)).cpu()

    def run_multistep(self, warmup: int = 4) -> float:
        """tokens / second of backend.greedy_steps from the same start (the replays overwrite the same slots)."""
        batch = self.decode_batch(self.prefill())
        self.model.backend.greedy_steps(batch, warmup)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.model.backend.greedy_steps(batch, self.steps)
        return self.B * self.steps / (time.perf_counter() - t0)

    def run(self, warmup: int = 4) -> float:
        """tokens / second over self.steps decode steps (after warm-up steps, which capture the graph)."""
        tokens = self.prefill()
        for _ in range(warmup):
            tokens = self.step(tokens)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(self.steps):
            tokens = self.step(tokens)
        torch.cuda.synchronize()
        return self.B * self.steps / (time.perf_counter() - t0)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    from engine.backends.cuda import argmax_rows as fast
    return fast(logits)


class OneRowSampler:
    """The sampler the Engine had before session 14, for --sampled: a step's logits copied to the host, then
    engine.sampler.pick_one_row a row at a time (the same tokens as Sampler's batched path, which keeps
    the logits on the GPU; tests/test_sampler.py)."""

    def __call__(self, logits, params, prompt_ids, output_ids, generators):
        from engine.sampler import SampleResult, pick_one_row
        logits = logits.cpu()
        return [SampleResult(pick_one_row(logits[i].clone(), p, prompt_ids[i], output_ids[i], generators[i]),
                             None, None) for i, p in enumerate(params)]


SAMPLED = {"T=0.7, top_p=0.9": {"temperature": 0.7, "top_p": 0.9},     # a chat UI's usual setting
           "T=1.0": {"temperature": 1.0}}                                # an OpenAI client's defaults
# --logprobs: an OpenAI client asking for top_logprobs=5 (pipelined since session 15; synchronous before)
LOGPROBS = {"T=0.7, top_p=0.9, logprobs=5": {"temperature": 0.7, "top_p": 0.9, "logprobs": 5}}


def engine_run(cfg: ModelConfig, backend, batch: int, prompt_len: int, steps: int, warmup: int = 4,
               pipelined: bool = True, sampling: dict | None = None, sampler=None, sample_graph: bool = True) -> dict:
    """The real Engine over backend: B random prompts, stepped on this thread until every sequence
    decodes, then `steps` timed decode steps. Returns tok/s and the host-side split of a step.
    pipelined=False turns off the engine's pipelined decode (Engine.step) for comparison; sampling: the
    requests' SamplingParams other than greedy (seeded per request); sampler: in place of the Engine's (which
    then takes every step: no sampled graph); sample_graph=False: pipelined sampled steps replay the logits
    graph and launch the Sampler after it (session 15's path), not the graph with the sampling kernel inside."""
    backend.supports_async = pipelined
    from engine.backends.base import settle_heap
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.sequence import SamplingParams
    per_seq = -(-(prompt_len + warmup + steps + 8) // BS)
    eng = Engine(cfg, backend, EngineConfig(backend="cuda", block_size=BS, num_blocks=batch * per_seq + 8,
                                            max_num_seqs=batch, max_batched_tokens=max(2048, batch),
                                            enable_prefix_caching=False, warmup=False))
    # warmup=False: the few graphs this run replays are captured by its own untimed steps below, not the
    # server's whole set (Engine's start-up warm-up, measured by gpu_serve.py)
    settle_heap()                                 # as engine.decoder.Decoder does once its model is loaded
    g = torch.Generator().manual_seed(batch + 7)
    for i in range(batch):
        params = SamplingParams(**(sampling or {"temperature": 0.0}), seed=i if sampling else None,
                                max_tokens=warmup + steps + 4, ignore_eos=True)
        eng.submit(torch.randint(0, cfg.vocab_size, (prompt_len,), generator=g).tolist(), params)
    if sampler is not None:
        eng.sampler = sampler
    if sampler is not None or not sample_graph:
        eng.model.sample_step = lambda *args: None      # (Backend.sample_step declining: the Sampler's path)
    while eng.counters["prefill_tokens"] < batch * prompt_len:
        eng.step()
    for _ in range(warmup):
        eng.step()
    spent = {"forward": 0.0, "sample": 0.0}
    fwd, smp = eng.model.forward, eng.sampler

    def timed(name, fn):
        def call(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t
        return call

    class TimedSampler:                          # the pipelined decode calls Sampler.tokens
        __call__ = staticmethod(timed("sample", smp))
        tokens = staticmethod(timed("sample", getattr(smp, "tokens", None)))
    eng.model.forward, eng.sampler = timed("forward", fwd), TimedSampler()
    torch.cuda.synchronize()
    tokens, t0 = 0, time.perf_counter()
    for _ in range(steps):
        tokens += eng.step()
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    eng.model.forward, eng.sampler = fwd, smp
    backend.supports_async = type(backend).supports_async
    return {"tok_s": tokens / total, "ahead": eng.counters["steps_ahead"] / max(1, eng.counters["steps"]), "step_ms": total / steps * 1e3, "forward_ms": spent["forward"] / steps * 1e3,
            "sample_ms": spent["sample"] / steps * 1e3,
            "other_ms": (total - spent["forward"] - spent["sample"]) / steps * 1e3}


AB_VARIANTS = {"nograph": "logits graph, then the kernel", "oneblock": "one block a row (kernel)"}


def graph_ab(cfg: ModelConfig, backend, name: str, batch: int, prompt_len: int, steps: int, rounds: int,
             other: str = "nograph") -> list[str]:
    """--graph-ab: the pipelined Engine's sampled steps through the sampled graph (the kernel inside) against
    `other` -- 'nograph': the logits graph then the kernel (sample_graph=False); 'oneblock': the sampled graph
    with the kernel at one block a row (no cluster) -- with greedy requests (the tokens graph) beside them,
    the three alternated `rounds` times (the host's speed drifts between runs): one table row a sampling
    setting, medians with their spread."""
    rows = []
    for label, kw in SAMPLED.items():
        runs: dict[str, list[float]] = {"graph": [], "other": [], "greedy": []}
        for _ in range(rounds):
            runs["graph"].append(engine_run(cfg, backend, batch, prompt_len, steps, sampling=kw)["tok_s"])
            backend.sample_blocks_per_row = 1 if other == "oneblock" else 0
            runs["other"].append(engine_run(cfg, backend, batch, prompt_len, steps, sampling=kw,
                                            sample_graph=other != "nograph")["tok_s"])
            backend.sample_blocks_per_row = 0
            runs["greedy"].append(engine_run(cfg, backend, batch, prompt_len, steps)["tok_s"])
        med = {k: statistics.median(v) for k, v in runs.items()}
        rows.append(f"| {name} | {batch} | {label} | {med['graph']:,.0f} ({min(runs['graph']):,.0f}-"
                    f"{max(runs['graph']):,.0f}) | {med['other']:,.0f} ({min(runs['other']):,.0f}-"
                    f"{max(runs['other']):,.0f}) | {med['graph'] / med['other']:.2f}x | {med['greedy']:,.0f} | "
                    f"{med['graph'] / med['greedy']:.2f}x |")
        print(rows[-1], flush=True)
    return rows


def gemv_bandwidth(cfg: ModelConfig, backend) -> list[str]:
    """Each GEMV of a batch-1 decode step alone: a graph of 20 calls cycling weight copies (so the L2
    holds none of them), plain and PDL launches; GB/s = weight bytes / time."""
    from engine.backends.cuda import GEMV_NORM, GEMV_NORM_SILU, GEMV_PLAIN, GEMV_SILU
    kn, w = backend.kernels, backend.w
    shapes = [("qkv", "layers.0.qkv", GEMV_NORM), ("o", "layers.0.o", GEMV_PLAIN),
              ("gate_up", "layers.0.gate_up", GEMV_NORM), ("down (SiLU prologue)", "layers.0.down", GEMV_SILU),
              ("gate_up + SiLU epilogue", "layers.0.gate_up", GEMV_NORM_SILU),
              ("down (plain)", "layers.0.down", GEMV_PLAIN), ("lm_head", "lm_head", GEMV_NORM)]
    shapes.append(("lm_head + argmax", "lm_head", "argmax"))
    flavours = ((False, False), (True, False), (False, True), (True, True))     # (pdl, deep)
    lines = ["| GEMV | n x k | MB | plain us | plain GB/s | PDL us | PDL GB/s | deep us | deep GB/s | PDL+deep us "
             "| PDL+deep GB/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, name, mode in shapes:
        weight = w[name]
        n, k = weight.shape
        copies = [weight] + [weight.clone() for _ in range(max(0, min(7, (256 << 20) // weight.nbytes)))]
        x = torch.randn(1, 2 * k if mode == GEMV_SILU else k, device="cuda", dtype=weight.dtype)
        nw = torch.ones(k, device="cuda", dtype=weight.dtype)
        out = torch.empty(1, n // 2 if mode == GEMV_NORM_SILU else n, device="cuda", dtype=weight.dtype)
        tokens = torch.empty(1, dtype=torch.int32, device="cuda")
        row = [f"| {label} | {n} x {k} | {weight.nbytes / 1e6:.1f} |"]
        for pdl, deep in flavours:
            def calls():
                for i in range(20):
                    if mode == "argmax":
                        kn.gemv_argmax(x, copies[i % len(copies)], GEMV_NORM, nw, out=out, tokens=tokens, pdl=pdl,
                                       deep=deep)
                        continue
                    kn.gemv(x, copies[i % len(copies)], mode, nw if mode in (GEMV_NORM, GEMV_NORM_SILU) else None,
                            out=out, pdl=pdl, deep=deep)
            calls()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                calls()
            times = []
            for _ in range(7):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                graph.replay()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3 / 20)
            t = statistics.median(times)
            row.append(f" {t * 1e6:.1f} | {weight.nbytes / t / 1e9:,.0f} |")
        lines.append("".join(row))
        del copies
    return lines


def profile_steps(runner: Runner, steps: int = 5) -> None:
    """Where a batch-1 decode step's GPU time goes (torch.profiler over a few graph replays)."""
    from torch.profiler import ProfilerActivity, profile
    tokens = runner.prefill()
    for _ in range(3):
        tokens = runner.step(tokens)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            tokens = runner.step(tokens)
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


PHASES = ("qkv", "attention", "o", "gate_up", "down")


def layers_profile(runner: Runner, calls: int = 20) -> list[str]:
    """Where the persistent decode-layers launch spends a batch-1 step: per phase, the time from the previous
    barrier's release to the last block's arrival (work) and from that arrival to the release (barrier),
    from the kernel's %globaltimer stamps, averaged over layers and launches."""
    be = runner.model.backend
    cfg = runner.model.config
    tokens = runner.prefill()
    batch = be.prepare(runner.decode_batch(tokens))
    stack = be.layer_stack()
    nb = 5 * cfg.num_layers - 1
    timing = torch.empty(nb, 3, dtype=torch.int64, device="cuda")
    work = {p: [] for p in PHASES}
    wait = {p: [] for p in PHASES}
    x0 = torch.nn.functional.embedding(batch.input_ids, be.w["embed"])
    for _ in range(calls):
        x = x0.clone()
        be.kernels.decode_layers(x, stack, batch.positions, batch.slot_mapping, batch.block_tables,
                                 batch.context_lens, cfg.rms_norm_eps, cfg.rope_theta, be.scale, timing=timing)
        t = timing.cpu().tolist()
        for i in range(1, nb):
            phase = PHASES[i % 5]            # barrier i ends phase i % 5 of its layer (barrier 0 ends qkv)
            work[phase].append((t[i][1] - t[i - 1][2]) / 1e3)
            wait[phase].append((t[i][2] - t[i][1]) / 1e3)
        work["qkv"].append(float("nan"))
    lines = [f"decode_layers phases ({cfg.num_layers} layers, batch {runner.B}, ctx {runner.ctx}; us, median):",
             "| phase | work (release -> last arrival) | barrier (last arrival -> release) |", "|---|---|---|"]
    tot = 0.0
    for p in PHASES:
        w = statistics.median([v for v in work[p] if v == v] or [float("nan")])
        b = statistics.median(wait[p] or [float("nan")])
        lines.append(f"| {p} | {w:.2f} | {b:.2f} |")
        tot += (w if w == w else 0) + (b if b == b else 0)
    lines.append(f"(a layer: {tot:.1f} us; the first qkv phase has no barrier before it)")
    return lines


def hf_tok_s(model, batch: int, prompt_len: int, steps: int, **gen) -> float:
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g).cuda()
    mask = torch.ones_like(ids)

    def gen_time(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **{"do_sample": False, **gen})
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
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--profile", action="store_true", help="kernel time table of a few batch-1 decode steps")
    ap.add_argument("--variants", nargs="+", default=["default"],
                    help="backend variants (see above; the GEMV-path settings matter at batches <= 8 only)")
    ap.add_argument("--gemv", action="store_true", help="per-GEMV bandwidth of the 1B-like model, batch 1")
    ap.add_argument("--layers-profile", action="store_true",
                    help="phase times of the persistent decode-layers launch at batch 1 (kernel timestamps)")
    ap.add_argument("--logprobs", action="store_true",
                    help="with --sampled: also rows asking for 5 logprobs (the synchronous column is how they ran "
                         "before they pipelined)")
    ap.add_argument("--one-row", action="store_true",
                    help="with --sampled: also the one-row host sampler (engine.sampler.pick_one_row a row at a time)")
    ap.add_argument("--sampled", action="store_true",
                    help="also sampled requests (SAMPLED): the Engine (fused sampling kernel), the Engine with the "
                         "torch-path sampler, and HF generate(do_sample=True)")
    ap.add_argument("--graph-ab", type=int, default=0, metavar="ROUNDS",
                    help="only the sampled graph against the logits graph + kernel (and greedy), alternated ROUNDS "
                         "times a point, medians (use --no-hf)")
    ap.add_argument("--ab-other", default="nograph", choices=sorted(AB_VARIANTS),
                    help="with --graph-ab: what the sampled graph is measured against")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from engine.backends.cuda import CudaBackend

    prop = torch.cuda.get_device_properties(0)
    print(f"# {prop.name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    lines = ["| model | batch | variant | Engine tok/s (pipelined) | Engine tok/s (synchronous) | synchronous step ms "
             "(forward / sample / other) | forward+argmax tok/s | gpu-multistep tok/s | HF generate tok/s | "
             "Engine / HF | Batch.build ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    extra: list[str] = []
    ab = [f"| model | batch | sampling | sampled graph tok/s, median (min-max) | {AB_VARIANTS[args.ab_other]} tok/s | "
          "sampled graph / it | greedy (tokens graph) tok/s | sampled graph / greedy |", "|---|---|---|---|---|---|---|---|"]
    sampled = ["| model | batch | sampling | Engine tok/s pipelined (steps ahead) | without the sampled graph "
               "(logits graph, then the kernel), pipelined tok/s (Engine / it) | synchronous tok/s | its sample ms "
               "a step | Engine with the torch-path sampler, pipelined tok/s | its synchronous sample ms | "
               + ("one-row host sampler tok/s | " if args.one_row else "") + "HF generate tok/s (do_sample) | "
               "Engine / HF | Engine / torch-path sampler |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.one_row else "")]
    for name in args.models:
        cfg = MODELS[name]
        hf = hf_model(cfg)
        weights = hf_weights(hf, cfg)
        backend = CudaBackend(cfg)
        backend.load_weights(weights)
        defaults = backend.use_pdl, backend.fuse_silu, backend.fuse_layers, backend.deep_gemv  # constructor's

        del weights
        hf = hf.to(torch.bfloat16)
        if args.no_hf:
            del hf
            hf = None
        gc.collect()
        torch.cuda.empty_cache()
        params = sum(t.numel() for n, t in backend.w.items() if n != "lm_head" or t is not backend.w["embed"])
        floor = params * 2 / 4.28e12
        print(f"{name}: {params / 1e6:.0f} M parameters, weight bytes / 4.28 TB/s = {floor * 1e3:.3f} ms "
              f"-> batch-1 ceiling {1 / floor:.0f} tok/s")
        model = LlamaModel(cfg, backend)
        if args.gemv and name == "llama1b":
            extra += [f"GEMVs of {name}, batch 1:", ""] + gemv_bandwidth(cfg, backend) + [""]
            print("\n".join(extra[-10:]), flush=True)
        if args.layers_profile:
            backend.fuse_layers = True
            backend.reset_graphs()
            with torch.inference_mode():
                extra += layers_profile(Runner(model, 1, args.prompt_len, args.steps)) + [""]
            backend.fuse_layers = defaults[2]
            backend.reset_graphs()
            print("\n".join(extra[-9:]), flush=True)
        for b in args.batches:
            if args.graph_ab:
                ab += graph_ab(cfg, backend, name, b, args.prompt_len, args.steps, args.graph_ab, args.ab_other)
                continue
            hf_ts = float("nan") if hf is None else hf_tok_s(hf, b, args.prompt_len, args.hf_steps)
            build = batch_build_cost(b, args.prompt_len + args.steps)
            variants = args.variants
            for variant in variants:
                tokens = variant.split("+")
                backend.use_pdl, backend.fuse_silu, backend.fuse_layers, backend.deep_gemv = defaults
                backend.__dict__.pop("forward_tokens", None)
                if "logits" in tokens:                 # the Engine's pipelined steps: logits graph + argmax
                    backend.forward_tokens = lambda batch: None
                backend.kernels.fused_merge = False if "kmerge" in tokens else None
                backend.decode_impl = next((t for t in tokens if t in ("tc", "simt")), None)
                if tokens[0] == "layers":
                    backend.fuse_layers = True
                elif tokens[0] != "default":           # base: the plain register GEMVs, no PDL, no fusion
                    backend.use_pdl = backend.fuse_silu = False
                for t in tokens:
                    if t in ("pdl", "nopdl"):
                        backend.use_pdl = t == "pdl"
                    elif t.startswith("pdl:"):                 # pdl:o/gate_up -- those GEMVs only
                        backend.use_pdl = tuple(t[4:].split("/"))
                    elif t == "fuse":
                        backend.fuse_silu = True
                    elif t == "nodeep":
                        backend.deep_gemv = ()
                    elif t.startswith("deep:"):                # deep:down/o -- those GEMVs
                        backend.deep_gemv = tuple(t[5:].split("/"))
                backend.reset_graphs()
                with torch.inference_mode():
                    fwd = Runner(model, b, args.prompt_len, args.steps).run()
                    multi = Runner(model, b, args.prompt_len, args.steps).run_multistep()
                    if args.profile and b == 1:
                        profile_steps(Runner(model, b, args.prompt_len, args.steps))
                sync = engine_run(cfg, backend, b, args.prompt_len, args.steps, pipelined=False)
                eng = engine_run(cfg, backend, b, args.prompt_len, args.steps)
                print(f"{name} B={b} variant={variant}: Engine {eng['tok_s']:,.0f} tok/s pipelined ({eng['ahead']:.0%} "
                      f"of steps launched ahead; step {eng['step_ms']:.2f} ms), {sync['tok_s']:,.0f} synchronous "
                      f"(step {sync['step_ms']:.2f} ms = forward {sync['forward_ms']:.2f} + sample "
                      f"{sync['sample_ms']:.2f} + other {sync['other_ms']:.2f}) | forward+argmax {fwd:,.0f} | "
                      f"multistep {multi:,.0f} | HF {hf_ts:,.0f} | Batch.build {build * 1e3:.2f} ms", flush=True)
                lines.append(f"| {name} | {b} | {variant} | {eng['tok_s']:,.0f} | {sync['tok_s']:,.0f} | "
                             f"{sync['step_ms']:.2f} ({sync['forward_ms']:.2f} / {sync['sample_ms']:.2f} / "
                             f"{sync['other_ms']:.2f}) | {fwd:,.0f} | {multi:,.0f} | {hf_ts:,.0f} | "
                             f"{eng['tok_s'] / hf_ts:.1f}x | {build * 1e3:.2f} |")
            if args.sampled:
                settings = dict(SAMPLED, **(LOGPROBS if args.logprobs else {}))
                for label, kw in settings.items():
                    hf_kw = {k: v for k, v in kw.items() if k != "logprobs"}     # HF: output_scores
                    if "logprobs" in kw:
                        hf_kw.update(output_scores=True, return_dict_in_generate=True)
                    hf_ts = float("nan") if hf is None else hf_tok_s(hf, b, args.prompt_len, args.hf_steps,
                                                                     do_sample=True, top_k=0, **hf_kw)
                    ours = engine_run(cfg, backend, b, args.prompt_len, args.steps, sampling=kw)
                    nograph = engine_run(cfg, backend, b, args.prompt_len, args.steps, sampling=kw, sample_graph=False)
                    sync = engine_run(cfg, backend, b, args.prompt_len, args.steps, sampling=kw, pipelined=False)
                    plain = Sampler(argmax=backend.argmax)              # session 14's: sample_rows
                    tp = engine_run(cfg, backend, b, args.prompt_len, args.steps, sampling=kw, sampler=plain)
                    tp_sync = engine_run(cfg, backend, b, args.prompt_len, args.steps, sampling=kw, sampler=plain,
                                         pipelined=False)
                    one_row = ""
                    if args.one_row:
                        old = engine_run(cfg, backend, b, args.prompt_len, min(args.steps, 16), warmup=2,
                                         sampling=kw, sampler=OneRowSampler(), pipelined=False)   # up to 1.7 s a step
                        one_row = f"{old['tok_s']:,.0f} | "
                    sampled.append(f"| {name} | {b} | {label} | {ours['tok_s']:,.0f} ({ours['ahead']:.0%}) | "
                                   f"{nograph['tok_s']:,.0f} ({ours['tok_s'] / nograph['tok_s']:.2f}x) | "
                                   f"{sync['tok_s']:,.0f} | {sync['sample_ms']:.2f} | "
                                   f"{tp['tok_s']:,.0f} | {tp_sync['sample_ms']:.2f} | {one_row}{hf_ts:,.0f} | "
                                   f"{ours['tok_s'] / hf_ts:.1f}x | {ours['tok_s'] / tp['tok_s']:.2f}x |")
                    print(sampled[-1], flush=True)
        del model, backend, hf
        gc.collect()
        torch.cuda.empty_cache()
    if args.sampled:
        lines += ["", "Sampled requests (seeded, one generator a request; sample ms includes waiting for the step's "
                  "forward on the GPU):", ""]
        lines += sampled
    if args.graph_ab:                          # nothing else ran
        lines = [f"Sampled graph A/B ({args.graph_ab} rounds a point, {args.steps} timed steps a run, pipelined):",
                 ""] + ab
    lines += [""] + extra
    emit(lines, args.out)


if __name__ == "__main__":
    main()
