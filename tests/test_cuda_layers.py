"""pa_decode_layers_cuda (every layer of a decode step in one persistent launch) against the per-kernel chain
it replaces (gemv_rope, decode attention, o / gate_up / down GEMVs, each with its own parity test in
test_cuda_kernels.py) and against a float32 torch reference of the same layers, on fresh random weights
and scattered pages; workspaces poisoned with NaN first."""
from __future__ import annotations

import pytest
import torch

from engine import native
from engine.backends.torch_ref import apply_rope, rope_cos_sin

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="no CUDA GPU visible to torch: persistent decode-layer parity not run")]

BS = 16
EPS, THETA = 1e-5, 10000.0
# (hidden, inter, heads, kv heads, head_dim, layers)
SHAPES = {
    "smollm2": (576, 1536, 9, 3, 64, 3),        # group 3 (padded to 4), the GEMV phases one row a warp
    "llama1b": (2048, 8192, 32, 8, 64, 2),      # the 1B-like layer
    "group8": (1024, 2816, 16, 2, 128, 2),      # head_dim 128, group 8
    "mha": (512, 1024, 4, 4, 128, 2),           # group 1
}


@pytest.fixture(scope="module")
def kernels():
    from engine.backends.cuda import CudaKernels
    return CudaKernels()


def rel_err(out, ref) -> float:
    assert not torch.isnan(out).any(), "NaN in the output (a workspace read before it was written)"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def make_case(shape, ctx_lens, dtype, seed):
    hidden, inter, nh, nkv, hd, n_layers = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g, device="cuda") * scale).to(dtype)

    rows = len(ctx_lens)
    per = max(1, -(-(max(ctx_lens) + 1) // BS))
    num_blocks = rows * per + 2
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
    tables = perm[:rows * per].view(rows, per).to(torch.int32).cuda()
    layers = []
    for _ in range(n_layers):
        layers.append({
            "input_norm": rnd(hidden, scale=0.2) + 1, "qkv": rnd((nh + 2 * nkv) * hd, hidden, scale=hidden ** -0.5),
            "o": rnd(hidden, nh * hd, scale=(nh * hd) ** -0.5), "post_norm": rnd(hidden, scale=0.2) + 1,
            "gate_up": rnd(2 * inter, hidden, scale=hidden ** -0.5), "down": rnd(hidden, inter, scale=inter ** -0.5),
            "key_cache": rnd(num_blocks, nkv, BS, hd), "value_cache": rnd(num_blocks, nkv, BS, hd)})
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device="cuda")
    positions = (ctx - 1).clamp_min(0)                     # the new token sits at the context's end
    slots = torch.stack([tables[m, positions[m] // BS] * BS + positions[m] % BS for m in range(rows)]).to(torch.int32)
    slots[ctx == 0] = -1                                   # a padding row: nothing stored, zero attention
    x = rnd(rows, hidden)
    return dict(layers=layers, x=x, positions=positions.to(torch.int32), slots=slots, tables=tables, ctx=ctx,
                nh=nh, nkv=nkv, hd=hd)


def clone_layers(layers):
    return [{k: (v.clone() if "cache" in k else v) for k, v in layer.items()} for layer in layers]


def run_chain(kernels, case, layers):
    """The per-kernel decode layer of CudaBackend._layer_gemv (fuse_rope, fuse_silu)."""
    from engine.backends.cuda import GEMV_NORM_SILU, GEMV_PLAIN
    x, nh, hd = case["x"].clone(), case["nh"], case["hd"]
    rows = x.shape[0]
    qsl = torch.arange(rows + 1, dtype=torch.int32, device="cuda")
    for L in layers:
        qkv = kernels.gemv_rope(x, L["qkv"], L["input_norm"], case["positions"], case["slots"], L["key_cache"],
                                L["value_cache"], nh, EPS, THETA)
        q = qkv[:, :nh * hd].view(rows, nh, hd)
        attn = kernels.paged_attention_decode(q, L["key_cache"], L["value_cache"], case["tables"], case["ctx"], qsl,
                                              hd ** -0.5, int(case["ctx"].max()))
        x = kernels.gemv(attn.reshape(rows, nh * hd), L["o"], residual=x)
        act = kernels.gemv(x, L["gate_up"], GEMV_NORM_SILU, L["post_norm"], eps=EPS)
        x = kernels.gemv(act, L["down"], GEMV_PLAIN, residual=x)
    return x


def run_reference(case, layers):
    """float32 torch: rms_norm, projections, rotate-half RoPE, softmax attention over the pages."""
    x, nh, nkv, hd = case["x"].float(), case["nh"], case["nkv"], case["hd"]
    rows = x.shape[0]
    cos, sin = rope_cos_sin(case["positions"].cpu().long(), hd, THETA, torch.float32)
    cos, sin = cos.cuda(), sin.cuda()

    def norm(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + EPS) * w.float()

    for L in layers:
        kc, vc = L["key_cache"].float(), L["value_cache"].float()
        y = norm(x, L["input_norm"]) @ L["qkv"].float().T
        q = apply_rope(y[:, :nh * hd].view(rows, nh, hd), cos, sin)
        k = apply_rope(y[:, nh * hd:(nh + nkv) * hd].view(rows, nkv, hd), cos, sin)
        v = y[:, (nh + nkv) * hd:].view(rows, nkv, hd)
        attn = torch.zeros(rows, nh, hd, device="cuda")
        for m in range(rows):
            c = int(case["ctx"][m])
            if c == 0:
                continue
            s = int(case["slots"][m])
            kc[s // BS, :, s % BS], vc[s // BS, :, s % BS] = k[m], v[m]
            t = torch.arange(c, device="cuda")
            blk = case["tables"][m].long()[t // BS]
            K = kc[blk, :, t % BS].repeat_interleave(nh // nkv, dim=1)     # [c, nh, hd]
            V = vc[blk, :, t % BS].repeat_interleave(nh // nkv, dim=1)
            p = torch.softmax(torch.einsum("hd,thd->ht", q[m], K) * hd ** -0.5, dim=-1)
            attn[m] = torch.einsum("ht,thd->hd", p, V)
        x = x + attn.reshape(rows, nh * hd) @ L["o"].float().T
        gu = norm(x, L["post_norm"]) @ L["gate_up"].float().T
        gate, up = gu.chunk(2, dim=-1)
        x = x + (torch.nn.functional.silu(gate) * up) @ L["down"].float().T
    return x


def poison(stack):
    for t in (stack.qkv, stack.attn, stack.act, stack.part_o, stack.part_ml):
        t.fill_(float("nan"))


CASES = [  # (shape, context lens, dtype)
    ("smollm2", [1], torch.bfloat16),                       # one token
    ("smollm2", [17, 16, 15, 300, 0], torch.bfloat16),      # block boundaries, a padding row
    ("smollm2", [2500, 40, 129], torch.float16),            # a split context (partials merged in-kernel)
    ("llama1b", [192], torch.bfloat16),                     # the e2e benchmark's batch-1 step
    ("llama1b", [5000, 33, 1, 64, 250, 16, 17, 900], torch.bfloat16),   # 8 rows
    ("group8", [1, 700, 4100], torch.bfloat16),
    ("group8", [64, 3000], torch.float16),
    ("mha", [33, 1200], torch.bfloat16),
]


@pytest.mark.parametrize("shape,ctx_lens,dtype", CASES)
def test_decode_layers_match_the_kernel_chain_and_float32(kernels, shape, ctx_lens, dtype):
    case = make_case(shape, ctx_lens, dtype, seed=len(ctx_lens) * 1000 + sum(ctx_lens))
    chain_layers, fused_layers = clone_layers(case["layers"]), clone_layers(case["layers"])
    want = run_chain(kernels, case, chain_layers)
    stack = kernels.layer_stack(fused_layers, case["nh"])
    poison(stack)
    x = case["x"].clone()
    got = kernels.decode_layers(x, stack, case["positions"], case["slots"], case["tables"], case["ctx"], EPS, THETA,
                                case["hd"] ** -0.5)
    torch.cuda.synchronize()
    assert got.data_ptr() == x.data_ptr(), "the residual stream is updated in place"
    err_chain = rel_err(got, want)
    err_ref = rel_err(got, run_reference(case, case["layers"]))
    err_chain_ref = rel_err(want, run_reference(case, case["layers"]))
    print(f"{shape} {ctx_lens} {dtype}: vs chain {err_chain:.2e}, vs float32 {err_ref:.2e} "
          f"(chain vs float32 {err_chain_ref:.2e})")
    assert err_chain <= 1e-2
    assert err_ref <= max(2e-2, 1.5 * err_chain_ref)
    for a, b in zip(fused_layers, chain_layers):           # the new tokens' K/V in their slots
        for name in ("key_cache", "value_cache"):
            for m, s in enumerate(case["slots"].tolist()):
                if s >= 0:
                    assert rel_err(a[name][s // BS, :, s % BS], b[name][s // BS, :, s % BS]) <= 1e-2
            mask = torch.ones(a[name].shape[0] * BS, dtype=torch.bool, device="cuda")
            mask[case["slots"][case["slots"] >= 0].long()] = False
            flat_a = a[name].permute(0, 2, 1, 3).reshape(-1, *a[name].shape[1:2], a[name].shape[3])
            flat_b = b[name].permute(0, 2, 1, 3).reshape(-1, *b[name].shape[1:2], b[name].shape[3])
            assert torch.equal(flat_a[mask], flat_b[mask]), "a slot other than the new tokens' was written"
    assert int(stack.counters.abs().sum()) == 0 and int(stack.barrier[0]) == 0, "workspace counters not reset"


def test_decode_layers_in_a_graph_replay_like_eager(kernels):
    """Captured once, replayed three times: the barrier and arrival counters come back to zero each
    launch (a stale count would hang or skip a barrier), and replays match eager launches bit for bit."""
    case = make_case("smollm2", [40, 2600, 1], torch.bfloat16, seed=7)
    eager_layers, graph_layers = clone_layers(case["layers"]), clone_layers(case["layers"])
    eager_stack = kernels.layer_stack(eager_layers, case["nh"])
    stack = kernels.layer_stack(graph_layers, case["nh"])
    args = (case["positions"], case["slots"], case["tables"], case["ctx"], EPS, THETA, case["hd"] ** -0.5)
    x = case["x"].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        kernels.decode_layers(x, stack, *args)             # warm-up launch (sets the kernel's smem limit)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernels.decode_layers(x, stack, *args)
    ref = case["x"].clone()
    kernels.decode_layers(ref, eager_stack, *args)         # eager twice: the warm-up and the capture's inputs
    for _ in range(3):
        graph.replay()
        kernels.decode_layers(ref, eager_stack, *args)
        torch.cuda.synchronize()
        assert torch.equal(x, ref)
    assert int(stack.barrier[0]) == 0 and int(stack.counters.abs().sum()) == 0


def test_decode_layers_rejects_what_it_cannot_run(kernels):
    case = make_case("smollm2", [20], torch.bfloat16, seed=3)
    stack = kernels.layer_stack(case["layers"], case["nh"], max_rows=1)
    x2 = torch.zeros(2, 576, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(native.NativeError, match="pa_decode_layers_cuda: 2 rows"):
        kernels.decode_layers(x2, stack, case["positions"], case["slots"], case["tables"], case["ctx"], EPS, THETA, 0.1)
    with pytest.raises(native.NativeError, match="layers\\[0\\].qkv"):
        bad = clone_layers(case["layers"])
        bad[0]["qkv"] = bad[0]["qkv"][:-64]
        kernels.layer_stack(bad, case["nh"])
    many = [dict(layer) for layer in case["layers"]]       # a GQA group of 9 > 8: refused by the kernel
    for layer in many:
        kc = layer["key_cache"]
        layer["key_cache"] = layer["value_cache"] = kc[:, :1].contiguous()
        layer["qkv"] = layer["qkv"][:(9 + 2) * 64].contiguous()
    stack9 = kernels.layer_stack(many, 9)
    with pytest.raises(native.NativeError, match="decode_layers_kernel: GQA group 9"):
        kernels.decode_layers(case["x"].clone(), stack9, case["positions"], case["slots"], case["tables"],
                              case["ctx"], EPS, THETA, 0.1)
