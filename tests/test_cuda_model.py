"""End to end on the GPU: CudaBackend's greedy tokens against the float32 reference and HF transformers.

Two models with the SmolLM2-135M configuration, weights rounded to bf16-representable values so the float32
reference, HF and the bf16/fp16 backends all hold the same numbers:

- Seeded random weights (HF's own init, std 0.02; q/k projections x3 so attention is not uniform). Random
  weights give flat next-token distributions, so bf16 (7-bit mantissa) and even fp16 (10-bit) greedy can
  part from fp32 on near-ties (measured on the H200: fp16 6/8 prompts and 222/256 tokens identical, bf16
  0-1/8). Each candidate's tokens are checked under teacher forcing: every token must be the float32
  reference's argmax, or a flip the candidate's measured logit error explains (reference margin <= 2 x max
  |logit error| at that step). Exact agreement counts are printed for the record (benchmarks/results_cuda.md).
- The same configuration trained from random init for TRAIN_STEPS steps on the GPU on a synthetic language
  that needs attention (tests/trained_model.py), so its predictions are confident like a trained model's.
  On prompts from that language the float32 reference, CudaBackend bf16 (graphs) and HF fp32 must give
  literally the same greedy tokens; the reference's smallest top-1/top-2 logit margin along the greedy
  path and bf16's largest logit error are printed to show why (margin >> error).
"""
from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch

from engine.backends.torch_ref import TorchRefBackend, apply_rope, paged_attention_ref, rope_cos_sin
from engine.batch import Batch
from engine.config import EngineConfig, ModelConfig
from engine.model import LlamaModel, fuse_weights
from engine.sequence import SamplingParams
from tests.trained_model import make_language, train_synthetic

pytestmark = [pytest.mark.cuda, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="no CUDA GPU visible to torch: CUDA end-to-end test not run")]

SMOL = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                   num_kv_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
                   max_position_embeddings=8192, tie_word_embeddings=True, name="smollm2-135m-random")
PROMPT_LENS = [5, 16, 17, 31, 64, 100, 129, 250]   # partial blocks, block boundaries, > one chunk
NEW_TOKENS = 32
BLOCK = 16
CHUNK = 48                                          # prefill chunk: later chunks sit on a cached prefix
TRAIN_STEPS = 600                                   # 16 x 320 tokens each; H200: 73 s, loss 0.885 (floor 0.876)
TRAIN_SEED = 7


class RefOnGpu(TorchRefBackend):
    """torch_ref in float32 on the GPU; its RoPE tables and attention run on the CPU, where torch_ref
    builds its index tensors (it mixes devices otherwise)."""

    def rope(self, q, k, positions):
        cos, sin = rope_cos_sin(positions.cpu(), self.config.head_dim, self.config.rope_theta, q.dtype)
        cos, sin = cos.to(q.device), sin.to(q.device)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def paged_attention(self, layer, q, batch):
        out = paged_attention_ref(q.cpu(), self.key_caches[layer].cpu(), self.value_caches[layer].cpu(),
                                  batch.block_tables.cpu(), batch.context_lens.cpu(),
                                  batch.query_start_loc.cpu(), self.config.head_dim ** -0.5)
        return out.to(q.device)


def hf_llama(seed: int):
    """HF's LlamaForCausalLM with the SMOL configuration and HF's own seeded init, on the GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM
    c = SMOL
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                      num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rope_theta=c.rope_theta,
                      rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to("cuda").eval()


@pytest.fixture(scope="module")
def hf_fp32():
    model = hf_llama(0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(3)
            layer.self_attn.k_proj.weight.mul_(3)
        for param in model.parameters():                # exactly representable in bf16 (and so in fp16)
            param.copy_(param.bfloat16().float())
    return model


@pytest.fixture(scope="module")
def fused(hf_fp32):
    return fuse_weights({k: v.detach().float().cpu() for k, v in hf_fp32.state_dict().items()}, SMOL)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, SMOL.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]


def num_blocks_for(prompts) -> tuple[int, int]:
    per_seq = -(-(max(map(len, prompts)) + NEW_TOKENS) // BLOCK)
    return per_seq, per_seq * len(prompts) + 1


def greedy(backend, prompts, new_tokens=NEW_TOKENS):
    """Chunked prefill and decode in one loop (mixed steps while long prompts still prefill)."""
    per_seq, nblocks = num_blocks_for(prompts)
    backend.allocate_kv_cache(nblocks, BLOCK)
    model = LlamaModel(SMOL, backend)
    tables = [list(range(s * per_seq, (s + 1) * per_seq)) for s in range(len(prompts))]
    tokens, computed = [list(p) for p in prompts], [0] * len(prompts)
    outs, logits_seen = [[] for _ in prompts], [[] for _ in prompts]
    while any(len(o) < new_tokens for o in outs):
        items, want, active = [], [], []
        for s, toks in enumerate(tokens):
            if len(outs[s]) >= new_tokens:
                continue
            todo = toks[computed[s]:computed[s] + CHUNK]
            end = computed[s] + len(todo)
            items.append((todo, computed[s], tables[s][:-(-end // BLOCK)]))
            want.append(end == len(toks))
            active.append((s, len(todo), end == len(toks)))
        logits = model.forward(Batch.build(items, BLOCK, want))
        row = 0
        for s, n_new, done in active:
            computed[s] += n_new
            if done:
                tok = int(logits[row].argmax())
                outs[s].append(tok)
                tokens[s].append(tok)
                logits_seen[s].append(logits[row].clone())
                row += 1
    return outs, [torch.stack(x) for x in logits_seen]


def teacher_forced(ref_backend, prompts, outs):
    """The reference's logits at every generated position of the given continuations: [s][j, vocab]."""
    per_seq, nblocks = num_blocks_for(prompts)
    ref_backend.allocate_kv_cache(nblocks, BLOCK)
    seqs = [p + o[:-1] for p, o in zip(prompts, outs)]
    items = [(toks, 0, list(range(s * per_seq, s * per_seq + -(-len(toks) // BLOCK)))) for s, toks in enumerate(seqs)]
    batch = Batch.build(items, BLOCK, [True] * len(seqs))
    rows, start = [], 0
    for p, toks in zip(prompts, seqs):
        rows += list(range(start + len(p) - 1, start + len(toks)))
        start += len(toks)
    batch = dataclasses.replace(batch, logits_indices=torch.tensor(rows, dtype=torch.int64))
    logits = LlamaModel(SMOL, ref_backend).forward(batch).cpu()    # forward's logits live on the GPU
    return list(logits.split([len(o) for o in outs]))


def check_against_ref(name, ref_logits, outs, cand_logits):
    """Assert every token is the reference argmax or an explained near-tie; return agreement numbers."""
    flips, errs, num, den = [], [], 0.0, 0.0
    for s, (ref, toks, cand) in enumerate(zip(ref_logits, outs, cand_logits)):
        cand = cand.float().cpu()
        err = (cand - ref).abs().amax(dim=-1)                                   # [steps]
        num += (cand - ref).pow(2).sum().item()
        den += ref.pow(2).sum().item()
        errs.append(err.max().item())
        for j, tok in enumerate(toks):
            best = int(ref[j].argmax())
            if tok != best:
                margin = (ref[j, best] - ref[j, tok]).item()
                flips.append((s, j, margin, err[j].item()))
                assert margin <= 2 * err[j].item(), (
                    f"{name}: prompt {s} step {j}: token {tok}, reference argmax {best} by {margin:.4f} "
                    f"(logit error there {err[j].item():.4f}) is not a near-tie")
    rel = (num / den) ** 0.5
    print(f"{name}: logits rel err {rel:.2e}, max |err| {max(errs):.3f}, explained near-tie flips {len(flips)}")
    return rel, flips


def agreement(a, b) -> str:
    same = sum(x == y for x, y in zip(a, b))
    toks = sum(sum(u == v for u, v in zip(x, y)) for x, y in zip(a, b))
    first = [next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), len(x)) for x, y in zip(a, b)]
    return f"{same}/{len(a)} prompts identical, {toks}/{sum(map(len, a))} tokens, first divergence {first}"


def hf_generate(model, prompts):
    outs, logits = [], []
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            res = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0)
            outs.append(res.sequences[0, len(p):].tolist())
            logits.append(torch.cat(res.logits).float().cpu())
    return outs, logits


@pytest.fixture(scope="module")
def runs(hf_fp32, fused, prompts):
    """Every candidate's greedy tokens and logits, and the float32 reference's."""
    from engine.backends.cuda import CudaBackend
    ref = RefOnGpu(SMOL, device="cuda")
    ref.load_weights(fused)
    cuda = CudaBackend(SMOL)
    cuda.load_weights(fused)
    r = {"ref": greedy(ref, prompts), "cuda": greedy(cuda, prompts)}
    eager = CudaBackend(SMOL, use_cuda_graphs=False)
    eager.load_weights(fused)
    r["cuda-eager"] = greedy(eager, prompts)
    half = CudaBackend(SMOL, dtype=torch.float16)
    half.load_weights(fused)
    r["cuda-fp16"] = greedy(half, prompts)
    r["hf-fp32"] = hf_generate(hf_fp32, prompts)
    r["hf-bf16"] = hf_generate(copy.deepcopy(hf_fp32).to(torch.bfloat16), prompts)
    r["_graphs"] = sorted(cuda._graphs)
    r["_prefill_graphs"] = sorted(cuda._prefill_graphs)
    return r, ref


def test_reference_matches_hf_fp32(runs, prompts):
    r, ref = runs
    print("ref fp32 vs HF fp32:", agreement(r["ref"][0], r["hf-fp32"][0]))
    check_against_ref("hf-fp32", teacher_forced(ref, prompts, r["hf-fp32"][0]), *r["hf-fp32"])


@pytest.mark.parametrize("name", ["cuda", "cuda-eager", "hf-bf16"])
def test_bf16_greedy_tokens(runs, prompts, name):
    r, ref = runs
    print(f"{name} vs ref fp32:", agreement(r[name][0], r["ref"][0]))
    print(f"{name} vs HF bf16:", agreement(r[name][0], r["hf-bf16"][0]))
    print(f"{name} vs HF fp32:", agreement(r[name][0], r["hf-fp32"][0]))
    rel, _ = check_against_ref(name, teacher_forced(ref, prompts, r[name][0]), *r[name])
    assert rel < 0.1, f"{name}: bf16 logits differ from the float32 reference by {rel:.3f} (relative)"


def test_fp16_greedy_tokens(runs, prompts):
    """float16 activations carry 3 more mantissa bits than bf16: ~8x smaller logit error, fewer flips."""
    r, ref = runs
    print("cuda-fp16 vs ref fp32:", agreement(r["cuda-fp16"][0], r["ref"][0]))
    print("cuda-fp16 vs HF fp32:", agreement(r["cuda-fp16"][0], r["hf-fp32"][0]))
    rel, _ = check_against_ref("cuda-fp16", teacher_forced(ref, prompts, r["cuda-fp16"][0]), *r["cuda-fp16"])
    bf16_rel, _ = check_against_ref("cuda", teacher_forced(ref, prompts, r["cuda"][0]), *r["cuda"])
    assert rel < bf16_rel / 4, f"fp16 logit error {rel:.2e} is not well below bf16's {bf16_rel:.2e}"


def test_graphs_were_used(runs):
    r, _ = runs
    print("captured decode graphs (bucket, split, kind):", r["_graphs"])
    print("captured prefill graphs (tokens, sequences, context):", r["_prefill_graphs"])
    assert (8, False, "logits") in r["_graphs"], "decode steps of 8 sequences did not replay a graph"
    # the first step: 8 prompts' first chunks (5 + 16 + 17 + 31 + 4 x 48 = 261 rows; a grid the kernel does
    # not split, so one graph for every context: 8192, graph_max_context); later mixed steps
    assert (512, 8, 8192) in r["_prefill_graphs"], "the first prefill step did not replay a graph"
    assert len(r["_prefill_graphs"]) >= 2, "mixed prefill + decode steps did not replay a graph"


@pytest.mark.parametrize("options, graphs", [({"prefill_graph_tokens": 0}, False),
                                             ({"prefill_sdpa_min_work": 1}, False),
                                             ({"prefill_graph_tokens": 64}, True)])
def test_prefill_graphs_left_out(fused, runs, prompts, options, graphs):
    """No prefill graph when they are switched off or when every chunk takes the SDPA route (its shapes
    follow the context); with a 64-token limit only the small steps replay one. Eager prefill steps
    among graph ones give the reference's tokens."""
    from engine.backends.cuda import CudaBackend
    _, ref = runs
    cuda = CudaBackend(SMOL, **options)
    cuda.load_weights(fused)
    outs, logits = greedy(cuda, prompts)
    print(options, "prefill graphs:", sorted(cuda._prefill_graphs))
    assert bool(cuda._prefill_graphs) == graphs, sorted(cuda._prefill_graphs)
    assert all(t <= cuda.prefill_graph_tokens for t, *_ in cuda._prefill_graphs)
    rel, _ = check_against_ref(f"cuda-{options}", teacher_forced(ref, prompts, outs), outs, logits)
    assert rel < 0.1


def test_follow_up_chunks_on_a_long_prefix(fused):
    """48-token chunks of a 900-token prompt: past 512 tokens of context each chunk's prefill attention cuts
    its keys into spans (a graph keyed by a 1024-token context, the spans merged in it); greedy tokens against
    the float32 reference under teacher forcing, the graph steps' logits those of eager steps."""
    from engine.backends.cuda import CudaBackend
    ref = RefOnGpu(SMOL, device="cuda")
    ref.load_weights(fused)
    g = torch.Generator().manual_seed(77)
    long_prompt = [torch.randint(0, SMOL.vocab_size, (900,), generator=g).tolist()]
    results = []
    for tokens in (None, 0):
        cuda = CudaBackend(SMOL, prefill_graph_tokens=tokens)
        cuda.load_weights(fused)
        assert cuda.kernels.prefill_split(48, 1, SMOL.num_kv_heads, SMOL.num_heads // SMOL.num_kv_heads,
                                          SMOL.head_dim, 1024) > 0
        outs, logits = greedy(cuda, long_prompt, new_tokens=8)
        results.append((outs, logits, sorted(cuda._prefill_graphs)))
    (outs, logits, graphs), (eager_outs, eager_logits, _) = results
    print("prefill graphs:", graphs)
    assert (64, 1, 1024) in graphs, graphs
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(logits[0], eager_logits[0]))
    print("graph vs eager max |logit diff|:", diff)
    assert outs == eager_outs and diff < 1e-2
    rel, _ = check_against_ref("cuda-long-prefix", teacher_forced(ref, long_prompt, outs), outs, logits)
    assert rel < 0.1


def test_prefill_graph_logits_equal_eager(fused, prompts):
    """A prefill graph step (rows and sequences padded to the bucket) and the same step eager: the same
    KV written (padding rows write none), logits within bf16 GEMM noise: two chunks of one sequence (the
    second on the cached prefix), 19 prompts at once, then a mixed step of 19 decode rows and a chunk."""
    from engine.backends.cuda import CudaBackend
    backends = []
    for tokens in (None, 0):
        b = CudaBackend(SMOL, prefill_graph_tokens=tokens)
        b.load_weights(fused)
        b.allocate_kv_cache(64 * 21 + 1, BLOCK)
        backends.append((b, LlamaModel(SMOL, b)))
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, SMOL.vocab_size, (n,), generator=g).tolist() for n in [70] + [3 + 7 * i for i in range(19)]]
    tables = [list(range(s * 64, (s + 1) * 64)) for s in range(len(seqs))]
    steps = [[(seqs[0][:40], 0, tables[0][:3])], [(seqs[0][40:], 40, tables[0][:5])],
             [(s[:-1], 0, t[:-(-(len(s) - 1) // BLOCK)]) for s, t in zip(seqs[1:], tables[1:]) if len(s) > 1],
             [(s[-1:], len(s) - 1, t[:-(-len(s) // BLOCK)]) for s, t in zip(seqs[1:], tables[1:])]
             + [([5, 6, 7], 70, tables[0][:5])]]
    for i, items in enumerate(steps):
        batch = Batch.build(items, BLOCK, [True] * len(items))
        (gb, gm), (eb, em) = backends
        got, want = gm.forward(batch), em.forward(batch)
        assert gb._prefill_graphs and not eb._prefill_graphs
        assert torch.isfinite(got).all()
        err = ((got - want).abs().amax() / want.abs().amax()).item()
        print(f"step {i}: {batch.num_tokens} rows, {batch.num_seqs} sequences, graph vs eager rel err {err:.2e}")
        assert err < 2e-2, f"step {i}: graph logits differ from eager by {err:.3e}"
    for layer in range(SMOL.num_layers):
        for cg, ce in ((gb.key_caches[layer], eb.key_caches[layer]), (gb.value_caches[layer], eb.value_caches[layer])):
            assert ((cg.float() - ce.float()).abs().amax() <= 2e-2 * ce.float().abs().amax()).item(), layer
    # a single sequence's short chunk splits its keys (graphs by context); 32 sequences do not (one graph)
    assert sorted(gb._prefill_graphs) == [(32, 1, 512), (32, 32, 8192), (64, 1, 512), (2048, 32, 8192)], \
        sorted(gb._prefill_graphs)
    gb.reset_graphs()                        # a new pool: capturing into the dropped graphs' pool would fail
    batch = Batch.build(steps[0], BLOCK, [True])
    first = gm.forward(batch)
    assert torch.equal(first, gm.forward(batch)) and list(gb._prefill_graphs) == [(64, 1, 512)]


def test_graph_variants(fused, runs, prompts):
    """Contexts within one partition (attention writes the output directly) and past it (split + merge)."""
    from engine.backends.cuda import CudaBackend
    _, ref = runs
    for batch_prompts, key in (([[7, 8, 9], list(range(100, 107)), list(range(2000, 2012))], (4, False, "logits")),
                               ([prompts[-1]], (1, True, "logits"))):
        cuda = CudaBackend(SMOL)
        cuda.load_weights(fused)
        outs, logits = greedy(cuda, batch_prompts)
        assert key in cuda._graphs, sorted(cuda._graphs)
        check_against_ref(f"cuda-graph-{key}", teacher_forced(ref, batch_prompts, outs), outs, logits)


@pytest.mark.parametrize("options", [{"decode_impl": "tc"}, {"use_pdl": True}, {"fuse_silu": True},
                                     {"decode_impl": "tc", "use_pdl": True, "fuse_silu": True},
                                     {"decode_impl": "simt", "use_pdl": False, "fuse_silu": False},
                                     {"fuse_rope": False}, {"fuse_rope": True, "use_pdl": True},
                                     {"fuse_layers": True}, {"deep_gemv": ()},
                                     {"deep_gemv": ("qkv", "o", "gate_up", "down", "lm_head"), "use_pdl": False},
                                     {"prefill_sdpa_min_work": 1}, {"prefill_impl": "simt"}])
def test_tensor_core_attention_and_pdl_graphs(fused, runs, prompts, options):
    """The tensor-core decode kernel (SmolLM2's group of 3 padded into an m16 tile), PDL-launched GEMVs and
    the fused gate_up+SiLU GEMV in the decode graphs, eager and graph steps, every prefill chunk (decode
    rows of mixed steps too) through the SDPA route, and the CUDA-core prefill kernel in place of the
    tensor-core one, against the float32 reference."""
    from engine.backends.cuda import CudaBackend
    _, ref = runs
    cuda = CudaBackend(SMOL, **options)
    cuda.load_weights(fused)
    outs, logits = greedy(cuda, prompts)
    assert (8, False, "logits") in cuda._graphs, sorted(cuda._graphs)
    rel, _ = check_against_ref(f"cuda-{options}", teacher_forced(ref, prompts, outs), outs, logits)
    assert rel < 0.1


@pytest.mark.parametrize("n_prompts", [1, 2])
def test_in_kernel_merge_graphs_equal_the_merge_kernel(fused, prompts, n_prompts):
    """The last partition block's merge gives the merge kernel's logits bit for bit (the same arithmetic),
    with and without PDL-launched GEMVs (the o GEMV then starts under the attention kernel), through graph
    steps whose contexts pass the partition (the longest prompts)."""
    from engine.backends.cuda import CudaBackend
    chosen = sorted(prompts, key=len)[-n_prompts:]
    results = []
    for use_pdl, fused_merge in ((False, False), (False, True), (True, None)):
        cuda = CudaBackend(SMOL, use_pdl=use_pdl)
        cuda.kernels.fused_merge = fused_merge
        cuda.load_weights(fused)
        outs, logits = greedy(cuda, chosen)
        assert (n_prompts, True, "logits") in cuda._graphs, sorted(cuda._graphs)
        results.append((outs, [t.cpu() for seq in logits for t in seq]))
    for outs, logits in results[1:]:
        assert outs == results[0][0]
        assert all(torch.equal(a, b) for a, b in zip(logits, results[0][1]))


def test_logits_stay_on_the_gpu(fused, runs):
    """Backend.logits and a graph step's forward_step return float32 logits on the GPU."""
    from engine.backends.cuda import CudaBackend
    cuda = CudaBackend(SMOL)
    cuda.load_weights(fused)
    outs, logits = greedy(cuda, [[1, 2, 3]], new_tokens=3)
    assert all(t.is_cuda and t.dtype == torch.float32 for t in logits)


def test_engine_end_to_end_on_cuda(runs, fused, prompts):
    """The team's Engine (scheduler, block manager, sampler) over CudaBackend: same checks."""
    from engine.backends.cuda import CudaBackend
    from engine.engine import Engine
    from tests.conftest import run_to_completion
    r, ref = runs
    backend = CudaBackend(SMOL)
    backend.load_weights(fused)
    eng = Engine(SMOL, backend, EngineConfig(backend="cuda", block_size=BLOCK, num_blocks=256, max_num_seqs=8,
                                             max_batched_tokens=256))
    # lengths that end on different steps: the step launched ahead drops the finished rows (its input
    # tokens gathered on the GPU from the tokens graph's output)
    lengths = [NEW_TOKENS - 3 * s for s in range(len(prompts))]
    done = run_to_completion(eng, [eng.submit(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
                                   for p, n in zip(prompts, lengths)])
    outs = [c.token_ids for c in done]
    assert [len(o) for o in outs] == lengths
    print("engine+cuda vs our cuda loop:", agreement(outs, r["cuda"][0]),
          f"({eng.counters['steps_ahead']} of {eng.counters['steps']} steps launched ahead)")
    assert eng.counters["steps_ahead"] > NEW_TOKENS // 2, "the pipelined decode did not run"
    assert eng.blocks.num_used_blocks == 0
    ref_logits = teacher_forced(ref, prompts, outs)
    tol = max((c.float().cpu() - t).abs().max().item() for c, t in
              zip(r["cuda"][1], teacher_forced(ref, prompts, r["cuda"][0])))
    for s, (toks, lg) in enumerate(zip(outs, ref_logits)):
        for j, tok in enumerate(toks):
            best = int(lg[j].argmax())
            assert tok == best or (lg[j, best] - lg[j, tok]).item() <= 2 * tol, (s, j, tok, best)


def test_sampled_requests_on_cuda(trained, fused, prompts):
    """Sampled requests through the Engine over CudaBackend, the sampler on the GPU. On the trained model
    (confident: no near-ties in bf16) top_k=1 at any temperature and a nucleus that holds one token are
    greedy, token for token. On random weights seeded rows pipeline through the sampled graph (the kernel
    inside the decode step's graph; rows with logprobs through the logits graph instead), and replay their
    tokens in a new engine without the pipeline; mixed greedy, sampled and penalised rows finish and free
    their blocks.
    (Not asserted: the same seed among other neighbours. Random weights give ~49k-token nuclei whose CDF
    steps are ~2e-5 apart, and logits or softmax sums that differ in the last bit with the batch's
    makeup can move a draw across a step; the CPU tests check neighbour independence on fixed logits.)"""
    from engine.backends.cuda import CudaBackend
    from engine.engine import Engine
    from tests.conftest import run_to_completion

    def run(weights, prompt_list, param_list, warmup=False, pipelined=True):
        backend = CudaBackend(SMOL)
        backend.load_weights(weights)
        backend.supports_async = pipelined
        eng = Engine(SMOL, backend, EngineConfig(backend="cuda", block_size=BLOCK, num_blocks=512, max_num_seqs=16,
                                                 max_batched_tokens=256, warmup=warmup))
        real, graphed = backend.sample_step, []

        def sample_step(*args):                      # count the steps the sampled graph took
            out = real(*args)
            graphed.append(out is not None)
            return out
        backend.sample_step = sample_step
        done = run_to_completion(eng, [eng.submit(p, sp) for p, sp in zip(prompt_list, param_list)])
        assert eng.blocks.num_used_blocks == 0
        return [c.token_ids for c in done], eng.counters["steps_ahead"], [c.logprobs for c in done], sum(graphed)
    n = 12
    fused_t, _, prompts_t, _ = trained
    like = lambda **kw: [SamplingParams(max_tokens=n, ignore_eos=True, **kw)] * len(prompts_t)
    greedy = run(fused_t, prompts_t, like(temperature=0.0))[0]
    assert run(fused_t, prompts_t, like(temperature=0.9, top_k=1))[0] == greedy
    assert run(fused_t, prompts_t, like(temperature=1.0, top_p=1e-6))[0] == greedy
    seeded = [SamplingParams(temperature=1.0, top_p=0.95, seed=100 + i, max_tokens=n, ignore_eos=True)
              for i in range(len(prompts))]
    # prompts of one length: every row decodes and finishes in the same steps, so the pipelined run's steps
    # hold the same rows as the synchronous run's (no finished row carried in a step launched ahead)
    even = [p[:16] for p in prompts if len(p) >= 16]
    first, ahead, _, graphed = run(fused, even, seeded)
    assert ahead >= n - 2, "sampled rows did not pipeline"
    assert graphed >= n - 2, "sampled rows did not take the sampled graph"
    assert run(fused, even, seeded, pipelined=False)[0] == first
    assert first != run(fused, even, like(temperature=0.0))[0]
    # rows with logprobs pipeline too: their logprobs come back with the step's tokens, as synchronously
    asking = [SamplingParams(**{**vars(sp), "logprobs": (0, 2, 5)[i % 3]}) for i, sp in enumerate(seeded)]
    asking[1] = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=3)
    tokens, ahead, logprobs, graphed = run(fused, even, asking)
    assert ahead >= n - 2, "rows with logprobs did not pipeline"
    assert graphed == 0, "rows with logprobs need the logits: not the sampled graph's steps"
    assert run(fused, even, asking, pipelined=False)[::2] == (tokens, logprobs)
    assert all([e["token_id"] for e in lp] == t for t, lp in zip(tokens, logprobs))
    others = [SamplingParams(**{**MIXED_CUDA[i % len(MIXED_CUDA)], "max_tokens": n, "ignore_eos": True})
              for i in range(len(prompts))]
    mixed = run(fused, prompts, [s if i % 2 else o for i, (s, o) in enumerate(zip(seeded, others))],
                warmup=True)[0]
    assert all(len(t) == n for t in mixed)


MIXED_CUDA = [dict(temperature=0.0), dict(temperature=0.7, top_k=40, repetition_penalty=1.2),
              dict(temperature=1.2, min_p=0.05, frequency_penalty=0.5), dict(temperature=0.0, presence_penalty=1.0)]


@pytest.mark.parametrize("rows", [8, 3])
def test_multi_step_greedy_on_the_gpu(runs, fused, prompts, rows):
    """greedy_steps (argmax fed back on the GPU, no host round trip) against the reference."""
    from engine.backends.cuda import CudaBackend
    _, ref = runs
    ps = prompts[:rows]
    cuda = CudaBackend(SMOL)
    cuda.load_weights(fused)
    first, _ = greedy(cuda, ps, new_tokens=1)                     # prefill + the first token
    per_seq, _ = num_blocks_for(ps)
    items = [([f[0]], len(p), list(range(s * per_seq, (s + 1) * per_seq))) for s, (p, f) in enumerate(zip(ps, first))]
    steps = cuda.greedy_steps(Batch.build(items, BLOCK, [True] * rows), NEW_TOKENS - 1)   # [steps, rows]
    outs = [[f[0]] + steps[:, s].tolist() for s, f in enumerate(first)]
    ref_logits = teacher_forced(ref, ps, outs)
    tol = max((c.float().cpu() - t).abs().max().item() for c, t in
              zip(runs[0]["cuda"][1], teacher_forced(ref, prompts, runs[0]["cuda"][0])))
    print(f"greedy_steps rows={rows} vs our cuda loop:", agreement(outs, runs[0]["cuda"][0][:rows]))
    for s, (toks, lg) in enumerate(zip(outs, ref_logits)):
        for j, tok in enumerate(toks):
            best = int(lg[j].argmax())
            assert tok == best or (lg[j, best] - lg[j, tok]).item() <= 2 * tol, (s, j, tok, best)


def first_decode_step(fused, prompts, rows: int):
    """A CudaBackend on the fused weights that has prefilled `rows` prompts (each one greedy token), its
    LlamaModel, and Batch.build's items for the decode step after it."""
    from engine.backends.cuda import CudaBackend
    ps = (prompts * 2)[:rows]
    cuda = CudaBackend(SMOL)
    cuda.load_weights(fused)
    first, _ = greedy(cuda, ps, new_tokens=1)
    per_seq, _ = num_blocks_for(ps)
    items = [([f[0]], len(p), list(range(s * per_seq, (s + 1) * per_seq))) for s, (p, f) in enumerate(zip(ps, first))]
    model = LlamaModel(SMOL, cuda)
    return cuda, model, items


@pytest.mark.parametrize("rows", [1, 3, 12])
def test_forward_tokens_equal_the_argmax_of_the_logits(fused, prompts, rows):
    """The tokens graph (argmax fused into the lm_head GEMV at <= 8 rows, argmax_rows over cuBLAS logits
    above) picks exactly the argmax of the logits graph's float32 logits for the same decode step."""
    cuda, model, items = first_decode_step(fused, prompts, rows)
    batch = Batch.build(items, BLOCK, [True] * rows)
    logits = model.forward(batch)
    tokens = model.forward_tokens(batch)
    assert tokens is not None and tokens.is_cuda and tokens.dtype == torch.int32 and tokens.shape == (rows,)
    assert torch.equal(tokens.long(), logits.argmax(-1))
    assert {k[2] for k in cuda._graphs} == {"logits", "tokens"}
    # a step whose rows do not all want logits is not a tokens step
    partial = Batch.build(items, BLOCK, [True] * (rows - 1) + [False])
    assert model.forward_tokens(partial) is None


@pytest.mark.parametrize("rows", [1, 3, 12])
def test_sample_step_equals_forward_and_sampler(fused, prompts, rows):
    """The sampled graph (Backend.sample_step: the fused sampling kernel inside the decode graph, the knobs
    in its one upload) gives the same tokens as the logits graph followed by the Sampler on cloned
    generators: greedy rows among sampled ones take the argmax, each sampled row draws one uniform from its
    own generator, padding rows (3 in a graph of 4) change nothing. A step whose rows do not all want
    logits is not a sampled step, and draws nothing."""
    from engine.sampler import Sampler, make_generator
    cuda, model, items = first_decode_step(fused, prompts, rows)
    batch = Batch.build(items, BLOCK, [True] * rows)
    kinds = [dict(temperature=1.0), dict(temperature=0.0), dict(temperature=0.7, top_p=0.9),
             dict(temperature=1.2, top_k=50), dict(temperature=0.9, min_p=0.02)]
    params = [SamplingParams(**kinds[i % len(kinds)]) for i in range(rows)]
    gens = [make_generator(500 + i) for i in range(rows)]
    twins = [copy.deepcopy(g) for g in gens]
    want = Sampler(argmax=cuda.argmax, sample=cuda.sample).tokens(model.forward(batch), params, twins)
    got = model.sample_step(batch, params, gens)
    assert got is not None and got.is_cuda and got.dtype == torch.int64 and got.shape == (rows,)
    assert torch.equal(got, want)
    assert [g.getstate() for g in gens] == [g.getstate() for g in twins]     # one uniform a sampled row
    assert "sampled" in {k[2] for k in cuda._graphs}
    partial = Batch.build(items, BLOCK, [True] * (rows - 1) + [False])
    state = [g.getstate() for g in gens]
    assert model.sample_step(partial, params, gens) is None and [g.getstate() for g in gens] == state


# ---- a trained model: confident predictions, literal equality -------------------------------------------
@pytest.fixture(scope="module")
def trained():
    """A second SMOL-config model trained on the synthetic language: fused weights, HF model, prompts, stats."""
    model = hf_llama(0)
    stats = train_synthetic(model, TRAIN_STEPS, "cuda", TRAIN_SEED)
    fused = fuse_weights({k: v.detach().float().cpu() for k, v in model.state_dict().items()}, SMOL)
    prompts = make_language(SMOL.vocab_size, TRAIN_SEED).prompts(PROMPT_LENS, seed=1234)
    return fused, model, prompts, stats


@pytest.fixture(scope="module")
def trained_runs(trained):
    """Greedy tokens and logits of the float32 reference, CudaBackend bf16 (graphs) and HF fp32."""
    from engine.backends.cuda import CudaBackend
    fused, model, prompts, _ = trained
    ref = RefOnGpu(SMOL, device="cuda")
    ref.load_weights(fused)
    cuda = CudaBackend(SMOL)
    cuda.load_weights(fused)
    r = {"ref": greedy(ref, prompts), "cuda": greedy(cuda, prompts), "hf-fp32": hf_generate(model, prompts)}
    r["_graphs"] = sorted(cuda._graphs)
    return r


def test_trained_model_learned_the_rule(trained):
    """Below the bigram floor only through attention; the record shows how close to the true floor."""
    stats = trained[3]
    print(f"trained {stats['steps']} steps ({stats['tokens']} tokens) in {stats['seconds']:.1f}s: loss "
          f"{stats['loss']:.3f}, floor {stats['floor']:.3f}, bigram floor {stats['bigram_floor']:.3f}; "
          f"curve {[(i, round(x, 2)) for i, x in stats['losses']]}")
    assert stats["loss"] < (stats["floor"] + stats["bigram_floor"]) / 2, "training did not learn the rule"


@pytest.mark.parametrize("name", ["cuda", "hf-fp32"])
def test_trained_greedy_tokens_equal_the_reference(trained_runs, name):
    """Literal equality on every prompt; the reference's margin along the path against the logit error."""
    (ref_outs, ref_logits), (outs, logits) = trained_runs["ref"], trained_runs[name]
    print(f"trained: {name} vs ref fp32:", agreement(outs, ref_outs))
    if name == "cuda":
        assert (8, False, "logits") in trained_runs["_graphs"], "decode steps of 8 sequences did not replay a graph"
    lowest, worst = float("inf"), 0.0
    for s, (ref_toks, toks, ref_lg, lg) in enumerate(zip(ref_outs, outs, ref_logits, logits)):
        n = next((j for j, (u, v) in enumerate(zip(ref_toks, toks)) if u != v), len(toks))
        top2 = ref_lg[:n + 1].topk(2, dim=-1).values.cpu()                          # [steps, 2]
        margin = top2[:, 0] - top2[:, 1]
        err = (lg[:n + 1].float().cpu() - ref_lg[:n + 1].cpu()).abs().amax(dim=-1)  # [steps]
        assert toks == ref_toks, (f"{name}: prompt {s} parts from the reference at step {n} (reference margin "
                                  f"{margin[n].item():.3f}, logit error there {err[n].item():.4f})")
        lowest, worst = min(lowest, margin.min().item()), max(worst, err.max().item())
    print(f"trained: min reference top-1/top-2 margin {lowest:.3f} along the greedy paths, "
          f"max |{name} logit error| {worst:.4f}")


def test_trained_cuda_equals_hf(trained_runs):
    print("trained: cuda bf16 vs HF fp32:", agreement(trained_runs["cuda"][0], trained_runs["hf-fp32"][0]))
    assert trained_runs["cuda"][0] == trained_runs["hf-fp32"][0]


# ---- served: the web app over the Engine on CudaBackend ----------------------------------------------------
def _post(port: int, path: str, body: dict, timeout: float = 60.0) -> tuple[int, bytes]:
    import http.client
    import json
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _serve(engine, tmp_path):
    """The web app over `engine` on a real threaded HTTP server; returns (port, server)."""
    import threading

    from werkzeug.serving import make_server

    from webapp import create_app
    app = create_app({"TESTING": True, "BEAM_EXPORT_PATH": str(tmp_path / "beam.jsonl")}, engine=engine)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_port, server


def test_served_over_http_on_cuda(trained, trained_runs, tmp_path):
    """What a user of `pagedecode serve --backend cuda` gets: the web app (a real threaded HTTP server) over the
    Engine's thread on CudaBackend. The 8 trained prompts arrive staggered from 8 client threads, so steps mix
    prefill chunks with decode rows and batch sizes change under the graphs; half stream over SSE (/stream),
    half ask /generate. Every answer must be the float32 reference's greedy tokens, literally, on a first round
    and on a second (the prompts' pages then come from the prefix cache). Then: a beam search (copy-on-write
    forks on the GPU) whose best candidate matches the same search on the reference backend, bad input
    answered with a 400 while the engine keeps serving, and a stream whose client hangs up mid-answer, after
    which every KV block is free. The Engine captured its graphs at start-up: no step captures another."""
    import json
    import socket
    import time
    from concurrent.futures import ThreadPoolExecutor

    pytest.importorskip("flask", reason="flask is not installed here: the served CUDA test needs the web app")
    from engine.backends.cuda import CudaBackend
    from engine.engine import Engine
    from tests.conftest import wait_until
    fused, _, prompts, _ = trained
    ref_outs = trained_runs["ref"][0]
    greedy_body = {"max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    engines, servers = {}, []
    for name, backend in (("cuda", CudaBackend(SMOL)), ("ref", RefOnGpu(SMOL, device="cuda"))):
        backend.load_weights(fused)
        engines[name] = Engine(SMOL, backend, EngineConfig(backend="cuda" if name == "cuda" else "torch",
                                                           block_size=BLOCK, num_blocks=512,
                                                           max_num_seqs=8, max_batched_tokens=256)).start()
    try:
        eng = engines["cuda"]
        shapes = len(eng.backend._graphs) + len(eng.backend._prefill_graphs)
        print(f"warm-up: {eng.warmup_shapes} graphs captured in {eng.warmup_s:.1f} s")
        assert eng.warmup_shapes == shapes > 0
        port, server = _serve(eng, tmp_path)
        servers.append(server)

        def ask(s: int) -> list[int]:
            time.sleep(0.004 * s)                  # arrivals while the earlier prompts prefill and decode
            body = {"prompt": prompts[s], **greedy_body}
            if s % 2:
                status, data = _post(port, "/generate", body)
                assert status == 200, data
                return json.loads(data)["token_ids"]
            status, data = _post(port, "/stream", body)
            assert status == 200, data
            events = [json.loads(line[6:]) for line in data.decode().splitlines() if line.startswith("data: {")]
            assert events[-1]["type"] == "done", events[-1]
            return sum((e["token_ids"] for e in events if e["type"] == "delta"), [])

        for round_ in ("first", "second (prefix cache)"):
            with ThreadPoolExecutor(len(prompts)) as pool:
                outs = list(pool.map(ask, range(len(prompts))))
            print(f"served on cuda, {round_} round, vs ref fp32:", agreement(outs, ref_outs))
            assert outs == ref_outs
        stats = eng.stats()
        assert stats["prefix_cache_hit_rate"] > 0, stats
        assert len(eng.backend._graphs) + len(eng.backend._prefill_graphs) == shapes, \
            "a step had a shape the start-up warm-up did not capture"

        # beam search: forks share pages, copy-on-write copies them on the GPU
        beam = {"prompt": prompts[4], "beam_width": 4, "max_tokens": 16, "rerank": False}
        status, data = _post(port, "/generate", beam)
        assert status == 200, data
        got = json.loads(data)
        rport, rserver = _serve(engines["ref"], tmp_path)
        servers.append(rserver)
        status, data = _post(rport, "/generate", beam)
        assert status == 200, data
        want = json.loads(data)
        print("beam on cuda vs ref fp32: best", got["candidates"][0]["token_ids"] == want["candidates"][0]["token_ids"],
              "all", [c["token_ids"] for c in got["candidates"]] == [c["token_ids"] for c in want["candidates"]])
        assert got["token_ids"] == want["token_ids"] and len(got["candidates"]) == 4

        # bad input: a 400 with a JSON body, and the engine still serves
        status, data = _post(port, "/generate", {"prompt": [SMOL.vocab_size], "max_tokens": 4})
        assert status == 400 and "token ids" in json.loads(data)["error"]["message"]
        status, data = _post(port, "/generate", {"prompt": [5] * eng.max_model_len, "max_tokens": 4})
        assert status == 400 and json.loads(data)["error"]["param"] == "prompt"
        status, data = _post(port, "/generate", {"prompt": prompts[0], **greedy_body})
        assert status == 200 and json.loads(data)["token_ids"] == ref_outs[0]

        # a client that hangs up mid-answer: the request is aborted and its blocks freed
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        body = json.dumps({"prompt": prompts[7], "max_tokens": 4000, "ignore_eos": True}).encode()
        sock.sendall(b"POST /stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        seen = b""
        while seen.count(b"data: {") < 3:
            seen += sock.recv(65536)
        assert eng.stats()["num_running"] == 1
        sock.close()
        assert wait_until(lambda: (s := eng.stats())["num_running"] == 0 and s["num_used_blocks"] == 0, 20.0), \
            eng.stats()
    finally:
        for server in servers:
            server.shutdown()
        for e in engines.values():
            e.stop()


def test_kv_cache_sized_to_the_gpu(fused):
    """No kv_cache_mb on the GPU: the cache takes what gpu_memory_utilization leaves after what is in use and
    the steps' reserve, the start-up warm-up still fits beside it, and a prompt runs. A second Engine on the
    same backend counts the old cache as free (allocate_kv_cache drops it first), and after release_kv_cache
    (what Decoder does before a reload) a new backend finds that memory free too: neither is smaller."""
    from engine.backends.cuda import CudaBackend
    from engine.engine import Engine
    from tests.conftest import run_to_completion
    total = torch.cuda.mem_get_info()[1]
    sizes, backend = [], None
    for round_ in ("first engine", "second engine, same backend", "new backend after release_kv_cache"):
        if backend is None or round_.startswith("new"):
            if backend is not None:
                backend.release_kv_cache()
            backend = CudaBackend(SMOL)
            backend.load_weights(fused)
        eng = Engine(SMOL, backend, EngineConfig(backend="cuda"))        # every limit the backend's default
        kv = eng.num_blocks * backend.kv_bytes_per_block(eng.block_size)
        free = torch.cuda.mem_get_info()[0]
        print(f"{round_}: KV cache {kv / 2**30:.1f} GiB ({eng.num_blocks} blocks) of {total / 2**30:.1f}; after a "
              f"warm-up of {eng.warmup_shapes} graphs {free / 2**30:.1f} GiB free on the card")
        assert eng.max_model_len == SMOL.max_position_embeddings and eng.warmup_shapes > 0
        assert (eng.config.max_num_seqs, eng.config.max_batched_tokens) == (128, 8192)
        assert total - free <= (backend.gpu_memory_utilization + 0.02) * total
        done = run_to_completion(eng, [eng.submit(list(range(5, 300)), SamplingParams(max_tokens=8, temperature=0.0))])
        assert len(done[0].token_ids) == 8 and eng.blocks.num_used_blocks == 0
        sizes.append(eng.num_blocks)
        del eng
    # none smaller than the first (H200, alone: 358,018 blocks, then 353,853 while the sizing still counted
    # the first engine's graphs as in use -- Engine now releases the old cache and graphs first)
    assert min(sizes[1:]) >= 0.99 * sizes[0], sizes
    backend.release_kv_cache()
