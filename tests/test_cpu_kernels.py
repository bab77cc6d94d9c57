"""libpa_cpu's kernels against the torch reference, on fresh random inputs with outputs poisoned (NaN)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.backends.cpu_int8 import CpuBatch, CpuInt8Backend, load_cpu_lib
from engine.backends.torch_ref import apply_rope, paged_attention_ref, rope_cos_sin
from engine.batch import Batch
from engine.config import ModelConfig
from engine.model import LlamaModel
from engine.native import NativeError


def _has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx2" in f.read()
    except OSError:
        return True


pytestmark = pytest.mark.skipif(not _has_avx2(), reason="the INT8 CPU kernels need AVX2")

PTR = {torch.float32: "float *", torch.int8: "int8_t *", torch.int32: "int32_t *",
       torch.int64: "int64_t *", torch.uint8: "void *"}


@pytest.fixture(scope="module")
def nl():
    return load_cpu_lib()          # a missing or stale library fails the tests: build with `make -C native cpu`


def call(nl, op: str, *args) -> None:
    """Call pa_<op>_cpu with tensors turned into typed pointers (None -> NULL); raise NativeError."""
    conv = [nl.ffi.NULL if a is None else nl.ptr(a, PTR[a.dtype]) if isinstance(a, torch.Tensor) else a
            for a in args]
    nl.check(getattr(nl.lib, f"pa_{op}_cpu")(*conv), op)


def quantize_int8_local(w: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference of the symmetric per-group int8 quantization (weights and activations)."""
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    scales = g.abs().amax(-1) / 127.0                                  # [N, K / group]
    inv = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
    q = torch.round(g * inv[..., None]).clamp_(-127, 127).to(torch.int8).reshape(n, k)
    return q.contiguous(), scales.contiguous()


def nan(*shape) -> torch.Tensor:
    return torch.full(shape, float("nan"))


def dequant(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    return (q.float().reshape(n, -1, 32) * s[..., None]).reshape(n, k)


def linear(nl, x, q, s, pool=None):
    m, k = x.shape
    y = nan(m, q.shape[0])
    scratch = torch.empty(((m * k + 63) & ~63) + m * (k // 32) * 4, dtype=torch.uint8)
    call(nl, "linear_q8", pool, y, scratch, scratch.numel(), x, q, s, m, q.shape[0], k)
    return y


# ---- quantization and GEMM ------------------------------------------------------------------------
def test_quantize_matches_torch(nl):
    torch.manual_seed(1)
    x = torch.randn(5, 96)
    x[1, 32:64] = 0.0                                  # an all-zero block: scale 0, values 0
    x[2, 7] = 3000.0                                   # an outlier only coarsens its own block
    xq, xs = torch.zeros(5, 96, dtype=torch.int8), nan(5, 3)
    call(nl, "quantize_q8", xq, xs, x, 5, 96)
    ref_q, ref_s = quantize_int8_local(x)
    torch.testing.assert_close(xs, ref_s, rtol=1e-6, atol=0)
    assert (xq.int() - ref_q.int()).abs().max() <= 1    # x * (127 / amax) vs x / (amax / 127) at ties
    assert (xq != ref_q).float().mean() < 0.01
    assert xs[1, 1] == 0 and (xq[1, 32:64] == 0).all()
    err = (dequant(xq, xs) - x).abs()
    assert (err <= xs.repeat_interleave(32, 1) / 2 * (1 + 1e-5) + 1e-12).all()


ISA_NAMES = {0: "avx2", 1: "avx-vnni", 2: "avx512-vnni"}


@pytest.fixture(params=sorted(ISA_NAMES), ids=list(ISA_NAMES.values()))
def isa(nl, request):
    """Caps the GEMM kernels at one instruction set for the test (skipped where the CPU lacks it)."""
    got = nl.lib.pa_set_isa_cpu(request.param)
    try:
        if got != request.param:
            pytest.skip(f"this CPU has no {ISA_NAMES[request.param]}")
        yield request.param
    finally:
        nl.lib.pa_set_isa_cpu(2)


@pytest.mark.parametrize("m,n,k", [(1, 576, 576), (1, 7, 32), (3, 5, 64), (2, 13, 1536), (8, 960, 576),
                                   (33, 100, 96), (5, 192, 576), (6, 9, 32), (17, 11, 160), (64, 576, 1536)])
def test_linear_within_quantization_bound(nl, isa, m, n, k):
    """|y - x @ w.T| <= sum_k |x_k| sw_k / 2 + sx_k / 2 (|w_k| + sw_k / 2), per element."""
    torch.manual_seed(m * 1000 + n + k)
    x, w = torch.randn(m, k), torch.randn(n, k) * 0.05
    x[0, min(5, k - 1)] = 400.0                        # a down_proj-like outlier in one block
    q, s = quantize_int8_local(w)
    y = linear(nl, x, q, s)
    _, xs = quantize_int8_local(x)
    sw, sx = s.repeat_interleave(32, 1), xs.repeat_interleave(32, 1)          # [n, k], [m, k]
    xa, wa = x.abs().double(), w.abs().double()
    bound = xa @ (sw.double() / 2).T + (sx.double() / 2) @ (wa + sw.double() / 2).T
    bound += 1e-5 * (xa @ wa.T) + 1e-6                  # float32 accumulation
    err = (y.double() - x.double() @ w.double().T).abs()
    assert torch.isfinite(y).all()
    assert (err <= bound).all(), f"max err/bound {(err / bound).max():.3f}"
    # and it computes exactly the quantized product (catches a wrong scale index the bound might hide)
    xq, xs2 = quantize_int8_local(x)
    torch.testing.assert_close(y, dequant(xq, xs2) @ dequant(q, s).T, rtol=1e-4, atol=1e-4)


def test_linear_on_worker_pool_matches_openmp(nl):
    torch.manual_seed(4)
    handle = nl.ffi.new("pa_pool_cpu **")
    nl.check(nl.lib.pa_pool_create_cpu(handle, 3), "pool_create")     # more members than cores: still correct
    try:
        for m, n, k in [(1, 4000, 576), (9, 700, 96), (1, 5, 32), (40, 700, 96)]:
            x, (q, s) = torch.randn(m, k), quantize_int8_local(torch.randn(n, k))
            assert torch.equal(linear(nl, x, q, s, pool=handle[0]), linear(nl, x, q, s))
    finally:
        nl.lib.pa_pool_destroy_cpu(handle[0])


def test_isa_levels_agree(nl):
    """Every instruction set the CPU has computes the same int32 block dots (floats: rounding order only)."""
    torch.manual_seed(5)
    x, (q, s) = torch.randn(37, 608), quantize_int8_local(torch.randn(21, 608))
    out = {}
    try:
        for level in sorted(ISA_NAMES):
            if nl.lib.pa_set_isa_cpu(level) == level:
                out[level] = linear(nl, x, q, s)
    finally:
        nl.lib.pa_set_isa_cpu(2)
    assert 0 in out
    for y in out.values():
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, out[0], rtol=1e-5, atol=1e-4)


def test_gemm_prequantized_matches_linear(nl):
    torch.manual_seed(3)
    x, w = torch.randn(6, 64), torch.randn(40, 64)
    q, s = quantize_int8_local(w)
    xq, xs = torch.empty(6, 64, dtype=torch.int8), nan(6, 2)
    call(nl, "quantize_q8", xq, xs, x, 6, 64)
    y = nan(6, 40)
    call(nl, "gemm_q8", y, xq, xs, q, s, 6, 40, 64)
    assert torch.equal(y, linear(nl, x, q, s))


# ---- norms, RoPE, SiLU, exp ------------------------------------------------------------------------
@pytest.mark.parametrize("rows,hidden", [(1, 576), (7, 64), (3, 100)])
def test_rms_norm(nl, rows, hidden):
    torch.manual_seed(rows + hidden)
    x, res, w = torch.randn(rows, hidden), torch.randn(rows, hidden), torch.randn(hidden)
    total = x + res
    ref = total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    out, res_io = nan(rows, hidden), res.clone()
    call(nl, "rms_norm", out, res_io, x, w, rows, hidden, 1e-5)
    torch.testing.assert_close(res_io, total, rtol=0, atol=0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out2 = nan(rows, hidden)
    call(nl, "rms_norm", out2, None, x, w, rows, hidden, 1e-5)
    torch.testing.assert_close(out2, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w, rtol=1e-5, atol=1e-5)


def test_rope_table_matches_torch_ref(nl):
    pos = torch.tensor([0, 1, 15, 16, 17, 511, 2047, 8191], dtype=torch.int64)
    cos, sin = nan(8, 32), nan(8, 32)
    call(nl, "rope_table", cos, sin, pos, 8, 64, 100000.0)
    ref_cos, ref_sin = rope_cos_sin(pos, 64, 100000.0)
    assert (cos - ref_cos[:, :32]).abs().max() <= 1e-6
    assert (sin - ref_sin[:, :32]).abs().max() <= 1e-6


@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim", [(1, 9, 3, 64), (5, 9, 3, 64), (3, 4, 4, 32)])
def test_rope_strided_in_place(nl, tokens, heads, kv_heads, head_dim):
    torch.manual_seed(tokens)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(tokens, width)
    pos = torch.randint(0, 4000, (tokens,), dtype=torch.int64)
    q_ref = qkv[:, : heads * head_dim].reshape(tokens, heads, head_dim).clone()
    k_ref = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].reshape(tokens, kv_heads, head_dim).clone()
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
    cos, sin = nan(tokens, head_dim // 2), nan(tokens, head_dim // 2)
    call(nl, "rope_table", cos, sin, pos, tokens, head_dim, 100000.0)
    q_view, k_view = qkv[:, : heads * head_dim], qkv[:, heads * head_dim:]
    nl.check(nl.lib.pa_rope_cpu(nl.ffi.cast("float *", q_view.data_ptr()), nl.ffi.cast("float *", k_view.data_ptr()),
                                nl.ptr(cos, "float *"), nl.ptr(sin, "float *"), tokens, heads, kv_heads, head_dim,
                                width, width), "rope")
    c, s = rope_cos_sin(pos, head_dim, 100000.0)
    torch.testing.assert_close(q_view.reshape(tokens, heads, head_dim), apply_rope(q_ref, c, s), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].reshape(tokens, kv_heads, head_dim),
                               apply_rope(k_ref, c, s), rtol=1e-5, atol=1e-5)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)


@pytest.mark.parametrize("rows,inter", [(1, 1536), (4, 13), (3, 64)])
def test_silu_mul(nl, rows, inter):
    torch.manual_seed(inter)
    gu = torch.randn(rows, 2 * inter) * 4
    out = nan(rows, inter)
    call(nl, "silu_mul", out, gu, rows, inter)
    torch.testing.assert_close(out, F.silu(gu[:, :inter]) * gu[:, inter:], rtol=2e-6, atol=1e-6)


def test_exp_lut_error(nl):
    x = torch.cat([torch.linspace(-20, 0, 200_001), torch.tensor([-80.0, -86.9, -87.5, -1000.0, -math.inf])])
    out = nan(x.numel())
    call(nl, "exp_lut", out, x, x.numel())
    ref = torch.exp(x.double())
    rel = ((out.double() - ref).abs() / ref.clamp_min(1e-300))[:200_001]
    print(f"exp LUT max relative error on [-20, 0]: {rel.max():.2e}")
    assert rel.max() < 2e-6
    assert (out[-3:] == 0).all() and out[-5] > 0


# ---- KV write and paged attention --------------------------------------------------------------------
def make_pool(num_blocks, nkv, bs, hd):
    kc = torch.zeros(num_blocks, nkv, bs, hd, dtype=torch.int8)
    return kc, kc.clone(), torch.zeros(num_blocks, nkv), torch.zeros(num_blocks, nkv)


def write_kv(nl, pool, k, v, slots):
    kc, vc, ks, vs = pool
    t, nkv, hd = k.shape
    call(nl, "write_kv_q8", kc, ks, vc, vs, k, v, slots, t, nkv, hd, kc.shape[2], kc.shape[0], nkv * hd, nkv * hd)


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix (symmetric, its own inverse)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / math.sqrt(n)


def pool_float(cache, scales):
    """The K or V vectors an int8 pool holds: head vectors are stored rotated by H (head_dim 2^k)."""
    stored = cache.float() * scales[:, :, None, None]
    hd = cache.shape[-1]
    return stored @ hadamard(hd) if hd & (hd - 1) == 0 else stored


def simulate_tile_scales(calls, src_rows, bs):
    """Per-token error bounds of the write rule: a call's run of tokens in one tile sets
    scale = max(scale, run absmax / 127) (fresh at offset 0); a raise costs earlier tokens half a step."""
    bound, scale = {}, {}
    for slots, rows in calls:
        t = 0
        while t < len(slots):
            if slots[t] < 0:
                t += 1
                continue
            n = 1
            while t + n < len(slots) and slots[t + n] == slots[t] + n and (slots[t] + n) % bs:
                n += 1
            blk, off = divmod(slots[t], bs)
            amax = max(src_rows[r].abs().max().item() for r in rows[t:t + n]) / 127
            if off == 0 or amax > scale[blk]:
                scale[blk] = amax
                for other in bound:
                    if other // bs == blk:
                        bound[other] += amax / 2
            for i in range(n):
                bound[slots[t] + i] = scale[blk] / 2
            t += n
    return bound, scale


def test_write_kv_quantizes_within_half_a_step(nl):
    """Each stored (Hadamard-rotated) token is within half a step of its tile's scale, plus half a step per
    later requantization; the pool then reads back as the original vectors."""
    torch.manual_seed(5)
    nkv, bs, hd = 3, 16, 64
    pool = make_pool(6, nkv, bs, hd)
    pool[2][:] = 50.0                                   # stale scales from an earlier owner of the blocks
    pool[3][:] = 50.0
    k, v = torch.randn(22, nkv, hd), torch.randn(22, nkv, hd)
    k[9] *= 30                                          # a large token mid-tile: requantizes its tile
    v[12] *= 5
    # three calls: a prefill chunk, a chunk continuing block 3 (+ block 1), single-token decodes
    calls = [(list(range(3 * bs, 3 * bs + 9)), list(range(0, 9))),
             ([3 * bs + i for i in range(9, 14)] + [1 * bs + i for i in range(3)] + [-1], list(range(9, 18))),
             ([3 * bs + 14], [18]), ([3 * bs + 15], [19]), ([1 * bs + 3], [20])]
    before = pool[0].clone()
    for slots, rows in calls:
        write_kv(nl, pool, k[rows], v[rows], torch.tensor(slots, dtype=torch.int32))
    rot = hadamard(hd)
    for src, cache, scales in ((k @ rot, pool[0], pool[2]), (v @ rot, pool[1], pool[3])):
        got = cache.float() * scales[:, :, None, None]        # the stored (rotated) vectors
        for h in range(nkv):
            bound, scale = simulate_tile_scales(calls, src[:, h], bs)
            for slots, rows in calls:
                for slot, r in zip(slots, rows):
                    if slot >= 0:
                        blk, off = divmod(slot, bs)
                        err = (got[blk, h, off] - src[r, h]).abs().max().item()
                        assert err <= bound[slot] * (1 + 1e-5) + 1e-7, (r, h, err, bound[slot])
            for blk, sc in scale.items():
                assert scales[blk, h].item() == pytest.approx(sc, rel=1e-6)   # offset 0 reset the stale 50
    assert pool[2][3, 0] > 0.1                             # the k outlier raised its tile's scale
    assert torch.equal(pool[0][[0, 2, 4, 5]], before[[0, 2, 4, 5]])   # untouched blocks, -1 skipped
    # read back un-rotated: H is orthonormal, so a token's L2 error is at most sqrt(hd) x its bound
    for orig, cache, scales in ((k, pool[0], pool[2]), (v, pool[1], pool[3])):
        back = pool_float(cache, scales)
        for h in range(nkv):
            bound, _ = simulate_tile_scales(calls, (orig @ rot)[:, h], bs)
            for slots, rows in calls:
                for slot, r in zip(slots, rows):
                    if slot >= 0:
                        err = (back[slot // bs, h, slot % bs] - orig[r, h]).norm().item()
                        assert err <= math.sqrt(hd) * bound[slot] * (1 + 1e-4) + 1e-6


def attention_case(nl, seqs, nh=9, nkv=3, hd=64, bs=16, seed=0):
    """seqs: (context_len, query_len) each. Random int8 pools, random block tables."""
    gen = torch.Generator().manual_seed(seed)
    need = [(c + bs - 1) // bs for c, _ in seqs]
    num_blocks = sum(need) + 3
    kc = torch.randint(-127, 128, (num_blocks, nkv, bs, hd), dtype=torch.int8, generator=gen)
    vc = torch.randint(-127, 128, (num_blocks, nkv, bs, hd), dtype=torch.int8, generator=gen)
    ks = torch.rand(num_blocks, nkv, generator=gen) * 0.02 + 0.001
    vs = torch.rand(num_blocks, nkv, generator=gen) * 0.02 + 0.001
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.full((len(seqs), max(need) + 1), -1, dtype=torch.int32)
    for s, n in enumerate(need):
        tables[s, :n] = torch.tensor([perm.pop() for _ in range(n)], dtype=torch.int32)
    qsl = torch.tensor([0] + [sum(q for _, q in seqs[: i + 1]) for i in range(len(seqs))], dtype=torch.int32)
    ctx = torch.tensor([c for c, _ in seqs], dtype=torch.int32)
    t = int(qsl[-1])
    q = torch.randn(t, nh, hd, generator=gen) * 2
    out = nan(t, nh, hd)
    call(nl, "paged_attention_q8", out, q, kc, ks, vc, vs, tables, ctx, qsl, len(seqs), t, nh, nkv, hd, bs,
         tables.shape[1], num_blocks, nh * hd, hd ** -0.5)
    ref = paged_attention_ref(q, pool_float(kc, ks), pool_float(vc, vs), tables, ctx, qsl, hd ** -0.5)
    return out, ref


@pytest.mark.parametrize("seqs", [
    [(1, 1)],                                   # one token
    [(16, 1)], [(32, 1)],                       # block boundary
    [(17, 1)], [(37, 1)],                       # partial last block
    [(33, 33)],                                 # prefill from empty, partial last block
    [(40, 7)],                                  # a chunk on top of a cached prefix
    [(5, 1), (16, 16), (50, 3), (1, 1), (23, 11)],   # a mixed batch
], ids=lambda s: "-".join(f"{c}c{q}q" for c, q in s))
def test_paged_attention_gqa(nl, isa, seqs):
    out, ref = attention_case(nl, seqs)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("nh,nkv,hd,bs", [(4, 4, 32, 8), (8, 1, 64, 32), (9, 3, 64, 64), (4, 2, 40, 16),
                                         (8, 2, 128, 16)])
def test_paged_attention_other_geometries(nl, isa, nh, nkv, hd, bs):
    out, ref = attention_case(nl, [(70, 1), (65, 20)], nh, nkv, hd, bs, seed=nh + bs)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# ---- status codes ---------------------------------------------------------------------------------------
def test_bad_arguments_raise(nl):
    x, q, s = torch.randn(2, 48), torch.zeros(4, 48, dtype=torch.int8), torch.zeros(4, 1)
    with pytest.raises(NativeError, match="multiple of 32"):
        call(nl, "gemm_q8", nan(2, 4), torch.zeros(2, 48, dtype=torch.int8), torch.zeros(2, 1), q, s, 2, 4, 48)
    small = torch.empty(10, dtype=torch.uint8)
    with pytest.raises(NativeError, match="scratch"):
        call(nl, "linear_q8", None, nan(2, 4), small, 10, torch.randn(2, 64), torch.zeros(4, 64, dtype=torch.int8),
             torch.zeros(4, 2), 2, 4, 64)
    with pytest.raises(NativeError, match="is NULL"):
        call(nl, "rms_norm", None, None, x, torch.ones(48), 2, 48, 1e-5)
    pool = make_pool(2, 1, 4, 8)
    with pytest.raises(NativeError, match="slot_mapping"):
        write_kv(nl, pool, torch.randn(1, 1, 8), torch.randn(1, 1, 8), torch.tensor([8], dtype=torch.int32))
    kc, vc, ks, vs = pool
    bad_table = torch.tensor([[0, 5]], dtype=torch.int32)
    with pytest.raises(NativeError, match="block_tables"):
        call(nl, "paged_attention_q8", nan(1, 1, 8), torch.randn(1, 1, 8), kc, ks, vc, vs, bad_table,
             torch.tensor([6], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32), 1, 1, 1, 1, 8, 4, 2, 2, 8,
             0.3)
    with pytest.raises(NativeError, match="context_len"):
        call(nl, "paged_attention_q8", nan(2, 1, 8), torch.randn(2, 1, 8), kc, ks, vc, vs,
             torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([1], dtype=torch.int32),
             torch.tensor([0, 2], dtype=torch.int32), 1, 2, 1, 1, 8, 4, 2, 2, 8, 0.3)
    with pytest.raises(NativeError, match="ids"):
        call(nl, "embed_q8", nan(1, 32), torch.tensor([7]), torch.zeros(4, 32, dtype=torch.int8), torch.ones(4, 1),
             1, 4, 32)


# ---- the backend: embed, copy_blocks, fused layer vs composed ops ---------------------------------------
TINY = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, rope_theta=10000.0)


def tiny_weights(cfg: ModelConfig, seed=0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen) * 0.2  # noqa: E731
    qkv_n = cfg.q_size + 2 * cfg.kv_size
    w = {"embed": r(cfg.vocab_size, cfg.hidden_size), "norm": 1 + r(cfg.hidden_size)}
    w["lm_head"] = w["embed"]
    for i in range(cfg.num_layers):
        w |= {f"layers.{i}.input_norm": 1 + r(cfg.hidden_size), f"layers.{i}.post_norm": 1 + r(cfg.hidden_size),
              f"layers.{i}.qkv": r(qkv_n, cfg.hidden_size), f"layers.{i}.o": r(cfg.hidden_size, cfg.q_size),
              f"layers.{i}.gate_up": r(2 * cfg.intermediate_size, cfg.hidden_size),
              f"layers.{i}.down": r(cfg.hidden_size, cfg.intermediate_size)}
    return w


@pytest.fixture()
def tiny_backend(nl):
    b = CpuInt8Backend(TINY, lib=nl)
    b.load_weights(tiny_weights(TINY))
    b.allocate_kv_cache(num_blocks=16, block_size=8)
    return b


def test_embed_reads_int8_rows(tiny_backend):
    ids = torch.tensor([0, 299, 5, 5])
    q, s = tiny_backend.q["embed"]
    torch.testing.assert_close(tiny_backend.embed(ids), dequant(q, s)[ids], rtol=0, atol=0)


def test_kv_pool_is_int8_and_copy_blocks_copies_scales(tiny_backend):
    b = tiny_backend
    assert b.key_caches[0].dtype == torch.int8
    assert b.kv_bytes_per_block(16) * 3.9 < 2 * TINY.num_layers * TINY.kv_size * 16 * 4
    for t in b.key_caches + b.value_caches:
        t.random_(-127, 128)
    for t in b.k_scales + b.v_scales:
        t.uniform_()
    b.copy_blocks([(1, 4), (2, 9)])
    for t in b.key_caches + b.value_caches + b.k_scales + b.v_scales:
        assert torch.equal(t[4], t[1]) and torch.equal(t[9], t[2])


def steps(cfg, block_size):
    """Two sequences: a 13-token prefill chunk + a 5-token one, a decode step for both, one for the first."""
    tables = [[3, 7], [10, 2]]
    first = Batch.build([(list(range(1, 14)), 0, tables[0]), (list(range(20, 25)), 0, tables[1])], block_size,
                        [True, True])
    second = Batch.build([([40], 13, tables[0]), ([41], 5, tables[1])], block_size, [True, True])
    third = Batch.build([([42], 14, tables[0])], block_size, [True])          # one token: columns split
    return [first, second, third]


def test_fused_layers_match_composed_ops(nl, isa):
    """forward_layers (every layer in one native call, on the worker pool or OpenMP) == model.layer over
    the separate ops."""
    logits = []
    for fused, pool in ((True, True), (True, False), (False, False)):
        b = CpuInt8Backend(TINY, lib=nl, use_pool=pool)
        b.load_weights(tiny_weights(TINY))
        b.allocate_kv_cache(num_blocks=16, block_size=8)
        if not fused:
            b.forward_layers = lambda *a: None
        model = LlamaModel(TINY, b)
        logits.append([model.forward(batch) for batch in steps(TINY, 8)])
    for a, c, e in zip(*logits):
        assert torch.isfinite(a).all()
        assert torch.equal(a, c)                       # the worker pool and OpenMP compute the same
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_all_layers_call_rejects_a_bad_batch(nl):
    """pa_llama_layers_cpu checks the batch once: a slot outside the pool is an error naming it, not a write."""
    b = CpuInt8Backend(TINY, lib=nl)
    b.load_weights(tiny_weights(TINY))
    b.allocate_kv_cache(num_blocks=4, block_size=8)
    batch = b.prepare(steps(TINY, 8)[0])
    batch.slot_mapping[0] = 4 * 8                      # one past the pool's last slot
    before = [t.clone() for t in b.key_caches]
    with pytest.raises(NativeError, match="pa_llama_layers_cpu.*slot_mapping"):
        b.forward_layers(b.embed(batch.input_ids), batch)
    assert all(torch.equal(x, y) for x, y in zip(before, b.key_caches))


def test_prepare_adds_rope_table(tiny_backend):
    batch = tiny_backend.prepare(steps(TINY, 8)[0])
    assert isinstance(batch, CpuBatch)
    cos, _ = rope_cos_sin(batch.positions, TINY.head_dim, TINY.rope_theta)
    torch.testing.assert_close(batch.rope_cos, cos[:, : TINY.head_dim // 2], rtol=0, atol=1e-6)


def test_load_quantized_weights_hf_names_match_quantize_on_load(nl):
    """The weights/ layout's int8 tensors (HF names, q/k/v separate) give the same model as quantize-on-load."""
    w = tiny_weights(TINY)
    c = TINY
    int8 = {"model.embed_tokens.weight": quantize_int8_local(w["embed"])}
    for i in range(c.num_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        q, k, v = w[f"layers.{i}.qkv"].split([c.q_size, c.kv_size, c.kv_size])
        g, u = w[f"layers.{i}.gate_up"].chunk(2)
        for name, t in ((a + "q_proj", q), (a + "k_proj", k), (a + "v_proj", v), (a + "o_proj", w[f"layers.{i}.o"]),
                        (m + "gate_proj", g), (m + "up_proj", u), (m + "down_proj", w[f"layers.{i}.down"])):
            int8[name + ".weight"] = quantize_int8_local(t)
    out = []
    for how in ("float", "int8"):
        b = CpuInt8Backend(TINY, lib=nl)
        if how == "float":
            b.load_weights(w)
        else:
            b.load_quantized_weights(int8, w)
        b.allocate_kv_cache(num_blocks=16, block_size=8)
        out.append(LlamaModel(TINY, b).forward(steps(TINY, 8)[0]))
    assert torch.equal(out[0], out[1])


# ---- the oneDNN path ------------------------------------------------------------------------------------

def test_onednn_open_reports_a_bad_library(nl):
    h = nl.ffi.new("pa_onednn_cpu **")
    with pytest.raises(NativeError, match="pa_onednn_open_cpu"):
        nl.check(nl.lib.pa_onednn_open_cpu(h, b"/nonexistent/libdnnl.so.3"), "onednn_open")
    assert h[0] == nl.ffi.NULL


def test_onednn_linear_matches_per_row_reference(nl):
    """Per-row activation scales, per-channel weights (benchmarks/cpu_kernels.py --install-onednn)."""
    import os
    lib = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       ".venv", "onednn-cpu-gomp", "lib", "libdnnl.so.3")
    if not os.path.exists(lib):
        pytest.skip("onednn-cpu-gomp is not installed (benchmarks/cpu_kernels.py --install-onednn)")
    h = nl.ffi.new("pa_onednn_cpu **")
    nl.check(nl.lib.pa_onednn_open_cpu(h, lib.encode()), "onednn_open")
    try:
        for m, n, k in [(1, 576, 576), (8, 192, 576), (3, 40, 1536)]:
            torch.manual_seed(m + n)
            x, w = torch.randn(m, k), torch.randn(n, k)
            ws = w.abs().amax(1) / 127
            wq = torch.round(w / ws[:, None]).to(torch.int8)
            y = nan(m, n)
            scratch = torch.empty(((m * k + 63) & ~63) + 4 * m, dtype=torch.uint8)
            call(nl, "linear_onednn", y, h[0], scratch, scratch.numel(), x, wq, ws, m, n, k)
            xs = x.abs().amax(1) / 127
            ref = (torch.round(x / xs[:, None]) * xs[:, None]) @ (wq.float() * ws[:, None]).T
            torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-3)
    finally:
        nl.lib.pa_onednn_close_cpu(h[0])
