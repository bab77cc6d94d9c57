"""Parity of every CUDA kernel (native/cuda) with the torch reference, plus the CPU-only export check."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from engine import native
from engine.backends.torch_ref import apply_rope, paged_attention_ref, rope_cos_sin

HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU visible to torch: CUDA kernel parity not run")
DTYPES = [torch.bfloat16, torch.float16]
TOL = 1e-2


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in the kernel's output (unwritten or poisoned)"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


# ---- always (CI has nvcc but no GPU) -----------------------------------------------------------
def test_header_declares_the_cuda_exports():
    names = native.declared_exports("cuda")
    for op in ("rms_norm", "silu_mul", "rope", "write_kv", "rope_write_kv", "paged_attention_decode",
               "paged_attention_decode_tc", "paged_attention_prefill", "paged_attention_prefill_tc", "prefill_tc_tile_tokens", "gemv", "gemv_rope", "decode_layers", "abi_version",
               "last_error"):
        assert f"pa_{op}_cuda" in names


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: libpa_cuda.so is not built here")
def test_library_exports_every_declared_symbol():
    lib = native.LIB_DIR / "libpa_cuda.so"
    assert lib.exists(), f"{lib} missing although nvcc is present: `make -C native cuda` failed?"
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if line.strip()}
    missing = [n for n in native.declared_exports("cuda") if n not in exported]
    assert not missing, f"declared in pa.h but not exported by {lib.name}: {missing}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: libpa_cuda.so is not built here")
def test_prefill_split_policy_without_a_gpu():
    """CudaKernels.prefill_split on the library's tile size (a host function) for an H200's 132 SMs: spans
    only for grids of at most 66 blocks and contexts past two minimum spans, whole key tiles."""
    from engine.backends.cuda import PREFILL_MIN_SPAN, CudaKernels
    k = CudaKernels.__new__(CudaKernels)                 # no GPU here: only what prefill_split reads
    k.lib, k.num_sms = native.load("cuda"), 132
    assert k.lib.lib.pa_prefill_tc_tile_tokens_cuda(64, 3) == 42 and k.lib.lib.pa_prefill_tc_tile_tokens_cuda(96, 4) == 0
    assert k.prefill_split(8192, 1, 3, 3, 64, 8192) == 0          # a whole prompt: 588 blocks
    assert k.prefill_split(128, 1, 3, 3, 64, 2 * PREFILL_MIN_SPAN) == 0
    assert k.prefill_split(512, 1, 8, 4, 64, 8192) == 0           # 128 blocks: left whole
    assert k.prefill_split(128, 1, 3, 3, 64, 8192) == 384         # 12 blocks -> 22 spans of 8192 / 22 -> 384
    assert k.prefill_split(128, 1, 8, 4, 128, 32768) == 6592      # 64 blocks -> 5 spans
    assert k.prefill_split(16, 1, 3, 3, 64, 600) == PREFILL_MIN_SPAN


# ---- GPU parity ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kernels():
    if not HAS_GPU:
        pytest.skip("no CUDA GPU visible to torch: CUDA kernel parity not run")
    from engine.backends.cuda import CudaKernels
    return CudaKernels()


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def randn(*shape, g, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 576), (7, 2048), (64, 576), (3, 4096)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(kernels, dtype, tokens, hidden, with_residual):
    g = gen(tokens * hidden + with_residual)
    x, w = randn(tokens, hidden, g=g, dtype=dtype), randn(hidden, g=g, dtype=dtype, scale=0.5) + 1
    res = randn(tokens, hidden, g=g, dtype=dtype) if with_residual else None
    out, total = kernels.rms_norm(x, w, 1e-5, res)
    s = x.double() + (res.double() if with_residual else 0)
    ref = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert rel_err(out, ref) <= TOL
    assert rel_err(total, s) <= 4e-3


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,inter", [(1, 1536), (33, 8192)])
def test_silu_mul(kernels, dtype, tokens, inter):
    g = gen(inter + tokens)
    gate_up = randn(tokens, 2 * inter, g=g, dtype=dtype, scale=3)
    out = kernels.silu_mul(gate_up)
    gd, ud = gate_up.double().chunk(2, dim=-1)
    assert rel_err(out, torch.nn.functional.silu(gd) * ud) <= TOL


def fused_qkv(T, nh, nkv, hd, g, dtype):
    """q, k, v as views into one [T, (nh + 2 nkv) hd] activation, as the model produces them."""
    qkv = randn(T, (nh + 2 * nkv) * hd, g=g, dtype=dtype)
    q = qkv[:, :nh * hd].view(T, nh, hd)
    k = qkv[:, nh * hd:(nh + nkv) * hd].view(T, nkv, hd)
    v = qkv[:, (nh + nkv) * hd:].view(T, nkv, hd)
    return qkv, q, k, v


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hd,nh,nkv,theta", [(64, 9, 3, 100000.0), (128, 32, 8, 500000.0)])
def test_rope_in_place_on_views(kernels, dtype, hd, nh, nkv, theta):
    g, T = gen(hd), 50
    qkv, q, k, v = fused_qkv(T, nh, nkv, hd, g, dtype)
    v_before = v.clone()
    pos = torch.randint(0, 32768, (T,), generator=g, device="cuda", dtype=torch.int32)
    pos[0], pos[1] = 0, 1
    cos, sin = rope_cos_sin(pos.cpu(), hd, theta, torch.float64)
    q_ref = apply_rope(q.double().cpu(), cos, sin)
    k_ref = apply_rope(k.double().cpu(), cos, sin)
    kernels.rope(q, k, pos, theta)
    assert rel_err(q.cpu(), q_ref) <= TOL and rel_err(k.cpu(), k_ref) <= TOL
    assert torch.equal(v, v_before), "RoPE wrote outside q and k"


def poisoned_cache(num_blocks, nkv, bs, hd, dtype):
    kc = torch.full((num_blocks, nkv, bs, hd), float("nan"), dtype=dtype, device="cuda")
    return kc, kc.clone()


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [False, True])
def test_write_kv_and_fused_rope_write(kernels, dtype, fused):
    g, T, nh, nkv, hd, bs, nb = gen(7 + fused), 40, 8, 2, 128, 16, 12
    qkv, q, k, v = fused_qkv(T, nh, nkv, hd, g, dtype)
    slots = torch.randperm(nb * bs, generator=torch.Generator().manual_seed(1))[:T].to(torch.int32).cuda()
    slots[3] = -1
    pos = torch.arange(T, dtype=torch.int32, device="cuda") + 1000
    kc, vc = poisoned_cache(nb, nkv, bs, hd, dtype)
    q_ref, k_ref = q.clone(), k.clone()
    if fused:
        kernels.rope(q_ref, k_ref, pos, 10000.0)
        kernels.rope(q, k, pos, 10000.0, cache=(kc, vc, v, slots))
        assert torch.equal(q, q_ref) and torch.equal(k, k_ref), "fused RoPE differs from pa_rope_cuda"
    else:
        kernels.write_kv(kc, vc, k, v, slots)
    s = slots.long()
    keep = s >= 0
    blk, off = s[keep] // bs, s[keep] % bs
    assert torch.equal(kc[blk, :, off], k_ref[keep]) and torch.equal(vc[blk, :, off], v[keep])
    written = torch.zeros(nb * bs, dtype=torch.bool, device="cuda")
    written[s[keep]] = True
    untouched = kc.permute(0, 2, 1, 3).reshape(nb * bs, nkv, hd)[~written]
    assert torch.isnan(untouched).all(), "a skipped (-1) or foreign slot was written"


def paged_setup(ctx_lens, q_lens, nh, nkv, hd, bs, dtype, g, spare_blocks=3):
    """Random K/V for each sequence in shuffled (non-contiguous) blocks; unused slots are NaN."""
    blocks_per = [-(-c // bs) for c in ctx_lens]
    total = sum(blocks_per) + spare_blocks
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(sum(ctx_lens)))
    width = max(max(blocks_per), 1)
    tables = torch.full((len(ctx_lens), width), -1, dtype=torch.int32)
    kc, vc = poisoned_cache(total, nkv, bs, hd, dtype)
    used = 0
    for s, (c, nblk) in enumerate(zip(ctx_lens, blocks_per)):
        ids = perm[used:used + nblk]
        used += nblk
        tables[s, :nblk] = ids.to(torch.int32)
        for j, b in enumerate(ids.tolist()):
            n = min(bs, c - j * bs)
            kc[b, :, :n] = randn(nkv, n, hd, g=g, dtype=dtype)
            vc[b, :, :n] = randn(nkv, n, hd, g=g, dtype=dtype)
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32)
    q = randn(int(qsl[-1]), nh, hd, g=g, dtype=dtype)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32)
    return q, kc, vc, tables.cuda(), ctx.cuda(), qsl.cuda()


def attention_ref(q, kc, vc, tables, ctx, qsl, scale):
    """torch_ref's attention in float64 on the CPU (its causal mask is built on the CPU)."""
    kc, vc = torch.nan_to_num(kc.double().cpu()), torch.nan_to_num(vc.double().cpu())   # NaN slots: unused
    return paged_attention_ref(q.double().cpu(), kc, vc, tables.long().cpu(), ctx, qsl, scale)


DECODE_CASES = [  # (context lens, head_dim, group)
    ([1], 128, 4),                       # one token
    ([17, 16, 15, 33], 64, 1),           # partial last block, block boundary
    ([4096], 128, 8),
    ([32768, 5], 128, 4),                # long context next to a short one
    ([300, 1000, 2049], 64, 3),          # SmolLM2's group of 3 (padded to 4 in the kernel)
    ([513, 64], 128, 12),                # group > 8: two head groups per kv head
    ([0, 40], 64, 4),                    # an empty (padding) sequence gets zeros
    ([700, 31], 128, 16),                # a full m16 tile of query heads (tensor-core kernel)
    ([90, 2], 64, 32),                   # two m16 tiles per kv head
    ([100 + 7 * i for i in range(70)], 128, 16),   # >= 132 (seq, kv head) units: 4-warp tensor-core blocks
]


@pytest.fixture(scope="module")
def decode_refs():
    """float64 references of DECODE_CASES, computed once per (case, dtype) for every impl/partition."""
    return {}


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ctx_lens,hd,group", DECODE_CASES)
@pytest.mark.parametrize("partition", [None, 16, 512, 2048])
@pytest.mark.parametrize("impl", ["simt", "tc", "tc-merge-kernel"])
def test_decode_attention(kernels, decode_refs, dtype, ctx_lens, hd, group, partition, impl):
    nkv, bs = 2, 16
    nh = nkv * group
    g = gen(sum(ctx_lens) + hd + group)
    q, kc, vc, tables, ctx, qsl = paged_setup(ctx_lens, [1] * len(ctx_lens), nh, nkv, hd, bs, dtype, g)
    scale = hd ** -0.5
    out = torch.full_like(q, float("nan"))
    max_ctx = max(ctx_lens)
    splits = None if partition is None else max(1, -(-max_ctx // partition)) + 2   # extra splits must exit
    key = (tuple(ctx_lens), hd, group, dtype)
    if key not in decode_refs:
        ref = attention_ref(q, kc, vc, tables, ctx.cpu(), qsl.cpu(), scale)
        ref[torch.tensor(ctx_lens) == 0] = 0
        decode_refs[key] = ref
    for _ in range(2):   # twice: the fused merge's counters must be back at zero after a launch
        kernels.paged_attention_decode(q, kc, vc, tables, ctx, qsl, scale, max_ctx, partition, splits, out=out,
                                       impl=impl[:2] if impl.startswith("tc") else impl,
                                       fused_merge=impl == "tc")
        assert rel_err(out.cpu(), decode_refs[key]) <= TOL
        out.fill_(float("nan"))


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("ctx_lens", [[1, 17], [200, 1000], [4096, 33], [48, 16]])
def test_decode_attention_sees_the_kv_the_kernel_before_wrote(kernels, ctx_lens):
    """A decode step's qkv GEMV (PDL, writes q and the newest position's K/V) then tensor-core attention
    (a PDL dependent that loads older K/V before its wait) in a graph: the newest slot is poisoned
    before every replay, so attention that read it before the GEMV wrote it would give NaN."""
    from engine.backends.cuda import GEMV_NORM
    nh, nkv, hd, bs, k, rows = 32, 8, 128, 16, 256, len(ctx_lens)
    g = gen(sum(ctx_lens))
    dt = torch.bfloat16
    _, kc, vc, tables, ctx, qsl = paged_setup(ctx_lens, [1] * rows, nh, nkv, hd, bs, dt, g)
    pos = (ctx - 1).to(torch.int32)
    slots = (tables.gather(1, (pos.long() // bs)[:, None])[:, 0] * bs + pos % bs).to(torch.int32)
    w = randn((nh + 2 * nkv) * hd, k, g=g, dtype=dt, scale=k ** -0.5)
    nw = randn(k, g=g, dtype=dt, scale=0.2) + 1
    x = torch.empty(rows, k, dtype=dt, device="cuda")
    qkv = torch.empty(rows, (nh + 2 * nkv) * hd, dtype=dt, device="cuda")
    out = torch.empty(rows, nh, hd, dtype=dt, device="cuda")
    q = qkv[:, :nh * hd].view(rows, nh, hd)

    def step():
        kernels.gemv_rope(x, w, nw, pos, slots, kc, vc, nh, 1e-5, 1e4, out=qkv, pdl=True)
        kernels.paged_attention_decode(q, kc, vc, tables, ctx, qsl, hd ** -0.5, max(ctx_lens), out=out, impl="tc")

    x.copy_(randn(rows, k, g=g, dtype=dt))
    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    blk, off = (slots // bs).long(), (slots % bs).long()          # cache [block, kv head, token, dim]
    for _ in range(3):
        x.copy_(randn(rows, k, g=g, dtype=dt))
        for c in (kc, vc):
            c[blk, :, off] = float("nan")
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert not kc[blk, :, off].isnan().any() and not vc[blk, :, off].isnan().any()
        ref = attention_ref(q, kc, vc, tables, ctx.cpu(), qsl.cpu(), hd ** -0.5)
        assert rel_err(out.cpu(), ref) <= TOL


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("bs", [8, 32, 64])
@pytest.mark.parametrize("impl", ["simt", "tc"])
def test_decode_attention_block_sizes(kernels, bs, impl):
    """Blocks smaller than a 16-token chunk (per-token addressing) and larger (chunks inside a block)."""
    g, nkv, hd, group = gen(bs), 2, 128, 4
    ctx_lens = [3 * bs + 5, bs, 1, 1000]
    q, kc, vc, tables, ctx, qsl = paged_setup(ctx_lens, [1] * 4, nkv * group, nkv, hd, bs, torch.bfloat16, g)
    ref = attention_ref(q, kc, vc, tables, ctx.cpu(), qsl.cpu(), hd ** -0.5)
    for partition in (None, 64):
        out = torch.full_like(q, float("nan"))
        splits = None if partition is None else -(-1000 // partition)
        kernels.paged_attention_decode(q, kc, vc, tables, ctx, qsl, hd ** -0.5, 1000, partition, splits, out=out,
                                       impl=impl)
        assert rel_err(out.cpu(), ref) <= TOL, partition


@pytest.mark.cuda
@needs_gpu
def test_decode_attention_tc_is_the_default_for_groups_of_4(kernels):
    """Groups >= 4 always; groups of 2-3 only with fewer (sequence, kv head) units than SMs; MHA never."""
    assert kernels.decode_impl(32, 8) == "tc" and kernels.decode_impl(9, 3) == "simt"
    assert kernels.decode_impl(9, 3, num_seqs=1) == "tc" and kernels.decode_impl(9, 3, num_seqs=64) == "simt"
    assert kernels.decode_impl(8, 8, num_seqs=1) == "simt"
    with pytest.raises(ValueError, match="impl"):
        g = gen(3)
        q, kc, vc, tables, ctx, qsl = paged_setup([20], [1], 4, 1, 64, 16, torch.bfloat16, g)
        kernels.paged_attention_decode(q, kc, vc, tables, ctx, qsl, 0.1, 20, impl="wgmma")


@pytest.mark.cuda
@needs_gpu
def test_decode_attention_block_size_8_and_fp16_scale(kernels):
    g, nkv, hd, bs = gen(99), 4, 128, 8
    q, kc, vc, tables, ctx, qsl = paged_setup([9, 100, 8], [1, 1, 1], 16, nkv, hd, bs, torch.float16, g)
    out = kernels.paged_attention_decode(q, kc, vc, tables, ctx, qsl, hd ** -0.5, 100)
    assert rel_err(out.cpu(), attention_ref(q, kc, vc, tables, ctx.cpu(), qsl.cpu(), hd ** -0.5)) <= TOL


@pytest.mark.cuda
@needs_gpu
def test_launches_go_to_torchs_current_stream(kernels):
    """_stream() is torch's current stream, on the default stream and inside a side stream's context."""
    assert int(kernels.ffi.cast("uintptr_t", kernels._stream())) == torch.cuda.current_stream().cuda_stream
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        assert int(kernels.ffi.cast("uintptr_t", kernels._stream())) == side.cuda_stream != 0


PREFILL_CASES = [  # (context lens, query lens, head_dim, group)
    ([1], [1], 64, 1),
    ([37, 16, 100], [37, 16, 50], 64, 3),         # whole prompts; chunk on a cached prefix
    ([250, 33, 1], [250, 1, 1], 128, 4),          # mixed prefill + decode rows
    ([64, 2048], [32, 100], 128, 8),
    ([32768], [24], 128, 4),                      # a chunk on a 32k prefix
    ([129], [129], 64, 12),
    ([1000, 65, 64, 63], [1000, 65, 64, 63], 128, 1),   # 64-key / 64-row tile boundaries +- 1
    ([700], [300], 64, 5),                        # 12 tokens a 64-row tile (60 rows), on a 400-token prefix
    ([2000, 5], [1500, 5], 128, 16),              # 4 tokens a tile
    ([96, 40], [96, 1], 64, 32),                  # 2 tokens a tile; a decode row of 32 heads
    ([77], [77], 128, 64),                        # one token a tile (the tensor-core kernel's largest group)
]


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ctx_lens,q_lens,hd,group", PREFILL_CASES)
@pytest.mark.parametrize("impl", ["simt", "tc"])
def test_prefill_attention(kernels, dtype, ctx_lens, q_lens, hd, group, impl):
    if impl == "simt" and group > 32:
        pytest.skip("the CUDA-core prefill kernel takes groups of at most 32")
    nkv, bs = 2, 16
    g = gen(sum(ctx_lens) * 7 + group)
    q, kc, vc, tables, ctx, qsl = paged_setup(ctx_lens, q_lens, nkv * group, nkv, hd, bs, dtype, g)
    out = torch.full_like(q, float("nan"))
    kernels.paged_attention_prefill(q, kc, vc, tables, ctx, qsl, hd ** -0.5, max(q_lens), out=out, impl=impl)
    assert rel_err(out.cpu(), attention_ref(q, kc, vc, tables, ctx.cpu(), qsl.cpu(), hd ** -0.5)) <= TOL


SPLIT_CASES = [  # (context lens, query lens, head_dim, group, keys a span)
    ([1000, 65, 64, 63], [1000, 65, 64, 63], 128, 1, 64),   # a span every key tile; rows on span boundaries
    ([700], [300], 64, 5, 128),
    ([2000, 5], [1500, 5], 128, 16, 256),
    ([4096, 300, 1], [100, 300, 1], 64, 3, 512),            # a follow-up turn on a 4k prefix, a prompt, a decode row
    ([32768], [24], 128, 4, 1024),
    ([513, 512, 511, 257], [2, 1, 3, 257], 64, 8, 256),    # positions around a span's first key
]


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ctx_lens,q_lens,hd,group,split_keys", SPLIT_CASES)
def test_prefill_attention_split_keys(kernels, dtype, ctx_lens, q_lens, hd, group, split_keys):
    """The tensor-core prefill kernel with its keys cut into spans (rows that see one span written by the
    kernel, the others merged from float32 partials), against the reference; output poisoned first."""
    nkv, bs = 2, 16
    g = gen(sum(ctx_lens) * 5 + split_keys)
    q, kc, vc, tables, ctx, qsl = paged_setup(ctx_lens, q_lens, nkv * group, nkv, hd, bs, dtype, g)
    out = torch.full_like(q, float("nan"))
    kernels.paged_attention_prefill(q, kc, vc, tables, ctx, qsl, hd ** -0.5, max(q_lens), out=out, impl="tc",
                                    split_keys=split_keys)
    assert not out.isnan().any()
    assert rel_err(out.cpu(), attention_ref(q, kc, vc, tables, ctx.cpu(), qsl.cpu(), hd ** -0.5)) <= TOL


@pytest.mark.cuda
@needs_gpu
def test_prefill_split_policy(kernels):
    """Spans only when the grid leaves SMs idle, at least PREFILL_MIN_SPAN keys, whole key tiles, and the
    same output as the unsplit kernel within bf16 rounding of the merge."""
    from engine.backends.cuda import PREFILL_MIN_SPAN
    sms = kernels.num_sms
    assert kernels.prefill_split(8192, 1, 3, 3, 64, 8192) == 0            # a whole prompt: blocks enough
    assert kernels.prefill_split(128, 1, 3, 3, 64, 400) == 0              # a short context: nothing to cut
    span = kernels.prefill_split(128, 1, 3, 3, 64, 8192)                  # a follow-up turn on 8k
    assert span >= PREFILL_MIN_SPAN and span % 64 == 0 and 8192 // span >= min(sms // 12, 8)
    g = gen(3)
    q, kc, vc, tables, ctx, qsl = paged_setup([6000], [128], 9, 3, 64, 16, torch.bfloat16, g)
    whole = kernels.paged_attention_prefill(q, kc, vc, tables, ctx, qsl, 0.125, 128, impl="tc", split_keys=0)
    split = kernels.paged_attention_prefill(q, kc, vc, tables, ctx, qsl, 0.125, 128, impl="tc", max_context_len=6000)
    assert rel_err(split.cpu(), whole.cpu()) <= TOL
    with pytest.raises(native.NativeError, match="not a multiple of 64 keys"):
        kernels.paged_attention_prefill(q, kc, vc, tables, ctx, qsl, 0.125, 128, impl="tc", split_keys=100)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("bs", [8, 32])
def test_prefill_attention_tc_block_sizes_and_q_stride(kernels, bs):
    """Pages of 8 and 32 tokens (a 64-key tile spans 8 or 2 of them) and q rows that are a view into a
    wider qkv buffer (row stride > nh x hd), as the model passes them."""
    nkv, group, hd = 4, 4, 128
    g = gen(bs)
    q, kc, vc, tables, ctx, qsl = paged_setup([300, 129], [200, 129], nkv * group, nkv, hd, bs, torch.bfloat16, g)
    wide = torch.full((q.shape[0], q.shape[1] + 2 * nkv, hd), float("nan"), dtype=q.dtype, device=q.device)
    wide[:, :q.shape[1]] = q
    qv = wide[:, :q.shape[1]]
    out = torch.full_like(q, float("nan"))
    kernels.paged_attention_prefill(qv, kc, vc, tables, ctx, qsl, hd ** -0.5, 200, out=out, impl="tc")
    assert rel_err(out.cpu(), attention_ref(q, kc, vc, tables, ctx.cpu(), qsl.cpu(), hd ** -0.5)) <= TOL


@pytest.mark.cuda
@needs_gpu
def test_prefill_attention_tc_rejects_groups_over_64(kernels):
    g = gen(5)
    q, kc, vc, tables, ctx, qsl = paged_setup([10], [10], 128, 1, 64, 16, torch.bfloat16, g)
    with pytest.raises(native.NativeError, match="prefill_tc_kernel: 128 query heads per kv head"):
        kernels.paged_attention_prefill(q, kc, vc, tables, ctx, qsl, 0.1, 10, impl="tc")
    with pytest.raises(ValueError, match="impl"):
        kernels.paged_attention_prefill(q, kc, vc, tables, ctx, qsl, 0.1, 10, impl="wgmma")


GEMV_CASES = [  # (rows, n, k, mode)
    (1, 960, 576, "norm"), (3, 576, 576, "plain"), (8, 1536, 576, "silu"),
    (1, 16384, 2048, "norm"), (4, 2048, 8192, "silu"), (2, 49152, 576, "plain"), (5, 2048, 2048, "plain"),
    (1, 16384, 2048, "norm_silu"), (3, 3072, 576, "norm_silu"), (8, 1000, 64, "norm_silu"),  # 500 outputs: partial group
    (2, 3072, 2048, "norm"), (4, 3072, 576, "plain"),       # 4 one-row-a-warp blocks an SM
]


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n,k,mode,with_residual",   # GEMV_NORM_SILU takes no residual
                         [c + (r,) for c in GEMV_CASES for r in (False, True) if not (r and c[3] == "norm_silu")])
@pytest.mark.parametrize("pdl", [False, True])
def test_gemv(kernels, dtype, rows, n, k, mode, with_residual, pdl):
    from engine.backends.cuda import GEMV_NORM, GEMV_NORM_SILU, GEMV_PLAIN, GEMV_SILU
    g = gen(rows * n + k + with_residual)
    x = randn(rows, 2 * k if mode == "silu" else k, g=g, dtype=dtype, scale=2.0)
    w = randn(n, k, g=g, dtype=dtype, scale=k ** -0.5)
    nw = randn(k, g=g, dtype=dtype, scale=0.2) + 1 if mode.startswith("norm") else None
    res = randn(rows, n, g=g, dtype=dtype) if with_residual else None
    out = torch.full((rows, n // 2 if mode == "norm_silu" else n), float("nan"), dtype=dtype, device="cuda")
    code = {"plain": GEMV_PLAIN, "norm": GEMV_NORM, "silu": GEMV_SILU, "norm_silu": GEMV_NORM_SILU}[mode]
    kernels.gemv(x, w, code, nw, res, 1e-5, out=out, pdl=pdl)
    xd = x.double()
    if mode == "norm_silu":
        xd = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * nw.double()
        gate, up = (xd @ w.double().T).chunk(2, dim=-1)
        assert rel_err(out, torch.nn.functional.silu(gate) * up) <= TOL
        return
    if mode == "norm":
        xd = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * nw.double()
    elif mode == "silu":
        gd, ud = xd.chunk(2, dim=-1)
        xd = torch.nn.functional.silu(gd) * ud
    ref = xd @ w.double().T + (res.double() if with_residual else 0)
    assert rel_err(out, ref) <= TOL


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("rows", [1, 3])
def test_gemv_pdl_chain_in_a_graph(kernels, rows):
    """Dependent GEMVs launched with PDL inside a captured graph: each reads the previous one's output,
    which it may only touch after its griddepcontrol.wait; fresh inputs on every replay."""
    g = gen(11 + rows)
    dt = torch.bfloat16
    ws = [randn(n, k, g=g, dtype=dt, scale=k ** -0.5) for n, k in ((2048, 576), (576, 2048), (49152, 576))]
    x = torch.empty(rows, 576, dtype=dt, device="cuda")
    outs = [torch.full((rows, w.shape[0]), float("nan"), dtype=dt, device="cuda") for w in ws]

    def chain():
        kernels.gemv(x, ws[0], out=outs[0], pdl=True)
        kernels.gemv(outs[0], ws[1], residual=x, out=outs[1], pdl=True)
        kernels.gemv(outs[1], ws[2], out=outs[2], pdl=True)

    x.copy_(randn(rows, 576, g=g, dtype=dt))
    chain()                                       # warm-up (and the attribute set-up) outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain()
    for _ in range(3):
        x.copy_(randn(rows, 576, g=g, dtype=dt))
        for o in outs:
            o.fill_(float("nan"))
        graph.replay()
        # each stage against its own (rounded) input: a stage that read before its producer wrote sees NaN
        assert rel_err(outs[0], x.double() @ ws[0].double().T) <= TOL
        assert rel_err(outs[1], outs[0].double() @ ws[1].double().T + x.double()) <= TOL
        assert rel_err(outs[2], outs[1].double() @ ws[2].double().T) <= TOL


@pytest.mark.cuda
@needs_gpu
def test_gemv_residual_may_alias_out(kernels):
    g = gen(77)
    x, w = randn(2, 576, g=g), randn(960, 576, g=g, scale=576 ** -0.5)
    x, w = x.bfloat16(), w.bfloat16()
    res = randn(2, 960, g=g, dtype=torch.bfloat16)
    ref = x.double() @ w.double().T + res.double()
    kernels.gemv(x, w, residual=res, out=res)
    assert rel_err(res, ref) <= TOL


@pytest.mark.cuda
@needs_gpu
def test_gemv_norm_silu_equals_norm_then_silu_gemv(kernels):
    """The fused gate_up epilogue rounds exactly as the two-step path (NORM GEMV, then SILU staging)."""
    from engine.backends.cuda import GEMV_NORM, GEMV_NORM_SILU
    g = gen(31)
    x = randn(3, 576, g=g, dtype=torch.bfloat16)
    w = randn(3072, 576, g=g, dtype=torch.bfloat16, scale=576 ** -0.5)
    nw = randn(576, g=g, dtype=torch.bfloat16, scale=0.2) + 1
    fused = kernels.gemv(x, w, GEMV_NORM_SILU, nw)
    two_step = kernels.silu_mul(kernels.gemv(x, w, GEMV_NORM, nw))
    assert torch.equal(fused, two_step)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n,k,mode,with_residual", [
    (1, 2048, 8192, "plain", True),        # the 1B-like down projection: 256 groups, <= 2 blocks an SM
    (3, 2048, 2048, "plain", False), (8, 576, 1536, "silu", True), (2, 960, 576, "norm", False),
    (5, 49152, 576, "plain", False),       # two rows a warp: the flag leaves it as it is
])
def test_gemv_deep_gives_the_same_bits(kernels, dtype, rows, n, k, mode, with_residual):
    """PA_CUDA_GEMV_DEEP changes how many loads are in flight, not the order of any lane's sums."""
    from engine.backends.cuda import GEMV_NORM, GEMV_PLAIN, GEMV_SILU
    g = gen(rows + n + k)
    x = randn(rows, 2 * k if mode == "silu" else k, g=g, dtype=dtype, scale=2.0)
    w = randn(n, k, g=g, dtype=dtype, scale=k ** -0.5)
    nw = randn(k, g=g, dtype=dtype, scale=0.2) + 1 if mode == "norm" else None
    res = randn(rows, n, g=g, dtype=dtype) if with_residual else None
    code = {"plain": GEMV_PLAIN, "norm": GEMV_NORM, "silu": GEMV_SILU}[mode]
    outs = [torch.full((rows, n), float("nan"), dtype=dtype, device="cuda") for _ in range(2)]
    for out, deep in zip(outs, (False, True)):
        kernels.gemv(x, w, code, nw, res, 1e-5, out=out, deep=deep, pdl=deep)
    assert torch.equal(outs[0], outs[1])
    assert not outs[1].isnan().any()


GEMV_ARGMAX_CASES = [  # (rows, n, k, mode): vocabularies of both models, a partial last group, 2 rows a warp
    (1, 49152, 576, "norm"), (3, 49152, 576, "plain"), (1, 128256, 2048, "norm"), (8, 128256, 2048, "norm"),
    (2, 1001, 64, "plain"), (5, 4000, 576, "norm"), (4, 300, 256, "plain"),
]


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n,k,mode", GEMV_ARGMAX_CASES)
@pytest.mark.parametrize("pdl,deep", [(False, False), (True, True)])
def test_gemv_argmax(kernels, dtype, rows, n, k, mode, pdl, deep):
    """Logits bit for bit those of pa_gemv_cuda; tokens torch.argmax of them (first maximum), repeated
    launches (the arrival count resets itself), poisoned outputs."""
    from engine.backends.cuda import GEMV_NORM, GEMV_PLAIN
    code = {"plain": GEMV_PLAIN, "norm": GEMV_NORM}[mode]
    g = gen(rows * 7 + n + k)
    w = randn(n, k, g=g, dtype=dtype, scale=k ** -0.5)
    nw = randn(k, g=g, dtype=dtype, scale=0.2) + 1 if mode == "norm" else None
    for launch in range(3):
        x = randn(rows, k, g=g, dtype=dtype, scale=2.0)
        out = torch.full((rows, n), float("nan"), dtype=dtype, device="cuda")
        tokens = torch.full((rows,), -7, dtype=torch.int32, device="cuda")
        kernels.gemv_argmax(x, w, code, nw, 1e-5, out=out, tokens=tokens, pdl=pdl, deep=deep)
        ref = kernels.gemv(x, w, code, nw, eps=1e-5)
        assert torch.equal(out, ref), f"launch {launch}"
        assert torch.equal(tokens.long(), ref.float().argmax(-1)), f"launch {launch}"


@pytest.mark.cuda
@needs_gpu
def test_gemv_argmax_ties_nan_and_inf(kernels):
    """Equal maxima go to the lowest index wherever the blocks that hold them finish; a NaN logit is the
    maximum (torch.argmax's rule); an all -inf row gives index 0."""
    from engine.backends.cuda import GEMV_PLAIN
    n, k, rows = 49152, 576, 4
    g = gen(5)
    w = randn(n, k, g=g, dtype=torch.bfloat16, scale=k ** -0.5)
    x = randn(rows, k, g=g, dtype=torch.bfloat16)
    for j in (40000, 33, 1000, 48000):          # four copies of one row, each ahead of the rest
        w[j] = 4 * w[7]
    x[0] = w[7] * 8
    x[1] = w[7] * 8
    x[2] = 0                                    # every logit 0: the first of the ties
    out, tokens = kernels.gemv_argmax(x, w, GEMV_PLAIN)
    assert tokens[:3].tolist() == [33, 33, 0]
    assert torch.equal(tokens.long(), out.float().argmax(-1))
    w2 = w.clone()
    w2[12345, 0] = float("nan")                 # NaN in every row's logit 12345 beats the tie
    out, tokens = kernels.gemv_argmax(x, w2, GEMV_PLAIN)
    assert tokens.tolist() == [12345] * rows == out.float().argmax(-1).tolist()
    w3 = torch.full((n, k), float("-inf"), dtype=torch.bfloat16, device="cuda")
    x3 = torch.ones(1, k, dtype=torch.bfloat16, device="cuda")
    out, tokens = kernels.gemv_argmax(x3, w3, GEMV_PLAIN)
    assert out.float().isneginf().all() and tokens.item() == 0


@pytest.mark.cuda
@needs_gpu
def test_gemv_argmax_rejects_what_it_cannot_do(kernels):
    from engine.backends.cuda import GEMV_NORM_SILU, GEMV_SILU
    x = torch.zeros(2, 64, dtype=torch.bfloat16, device="cuda")
    w = torch.zeros(128, 64, dtype=torch.bfloat16, device="cuda")
    for mode in (GEMV_SILU, GEMV_NORM_SILU):
        with pytest.raises(native.NativeError, match="GEMV_PLAIN or GEMV_NORM"):
            kernels.gemv_argmax(x, w, mode)
    with pytest.raises(native.NativeError, match="tokens"):
        kernels.gemv_argmax(x, w, tokens=torch.zeros(2, dtype=torch.int64, device="cuda"))
    kernels.gemv_argmax(x, w)                   # the workspace exists
    ws = kernels._argmax_ws
    try:                                        # a workspace too small for the launch's grid
        kernels._argmax_ws = (ws[0][:1], ws[1][:1], ws[2])
        with pytest.raises(native.NativeError, match="capacity"):
            kernels.gemv_argmax(x, torch.zeros(49152, 64, dtype=torch.bfloat16, device="cuda"))
    finally:
        kernels._argmax_ws = ws


def greedy_advance_ref(tokens, step, token_log, ids, pos, ctx, slots, tables, bs):
    """The torch ops the multi-step greedy graph ran before pa_greedy_advance_cuda (int32 in place)."""
    live = ctx > 0
    token_log.index_copy_(0, step.long(), tokens[None])
    step += 1
    ids.copy_(torch.where(live, tokens, ids))
    pos.add_(live.to(torch.int32))
    ctx.add_(live.to(torch.int32))
    page = tables.gather(1, (pos.long() // bs)[:, None])[:, 0]
    slots.copy_(torch.where(live, page * bs + pos % bs, slots))


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("rows,bs", [(1, 16), (8, 16), (128, 32), (300, 8)])
def test_greedy_advance(kernels, rows, bs):
    g = gen(rows + bs)
    width = 64
    tables = torch.randperm(rows * width, generator=g, device="cuda").to(torch.int32).view(rows, width)
    ctx = torch.randint(1, (width - 2) * bs, (rows,), generator=g, device="cuda", dtype=torch.int32)
    ctx[rows // 2] = 0                           # a padding row
    pos = (ctx - 1).clamp(min=0)
    slots = torch.where(ctx > 0, tables.gather(1, (pos.long() // bs)[:, None])[:, 0] * bs + pos % bs, -1)
    state = [torch.randint(0, 1000, (rows,), generator=g, device="cuda", dtype=torch.int32), pos, ctx,
             slots.to(torch.int32)]
    ours = [t.clone() for t in state] + [torch.zeros(1, dtype=torch.int32, device="cuda"),
                                         torch.full((5, rows), -9, dtype=torch.int32, device="cuda")]
    ref = [t.clone() for t in ours]
    for _ in range(3):
        tokens = torch.randint(0, 1000, (rows,), generator=g, device="cuda", dtype=torch.int32)
        ids, p, c, sl, step, log = ours
        kernels.greedy_advance(tokens, step, log, ids, p, c, sl, tables, bs)
        ids, p, c, sl, step, log = ref
        greedy_advance_ref(tokens, step, log, ids, p, c, sl, tables, bs)
        for a, b in zip(ours, ref):
            assert torch.equal(a, b)
    assert ours[4].item() == 3 and (ours[5][3:] == -9).all()


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,nh,nkv,hd,k,bs,theta", [
    (1, 9, 3, 64, 576, 16, 1e5),          # SmolLM2, one row
    (2, 32, 8, 64, 2048, 16, 5e5),        # Llama-3.2-1B-like, two rows
    (3, 32, 8, 128, 2048, 16, 5e5),       # Llama-3.2-1B-like, GQA 4
    (8, 4, 4, 32, 64, 8, 1e4),            # GQA 1, eight rows, small blocks
    (5, 16, 2, 64, 256, 32, 1e4),         # GQA 8
])
def test_gemv_rope_equals_gemv_then_rope_write_kv(kernels, dtype, rows, nh, nkv, hd, k, bs, theta):
    """The fused qkv epilogue writes the same bits as GEMV(NORM) + pa_rope_write_kv_cuda: out (q and k
    rotated, v), and k / v in their slots (a -1 slot stores nothing), and agrees with a float64 reference."""
    from engine.backends.cuda import GEMV_NORM
    g = gen(rows * 100 + nh + k)
    n = (nh + 2 * nkv) * hd
    x = randn(rows, k, g=g, dtype=dtype, scale=2.0)
    w = randn(n, k, g=g, dtype=dtype, scale=k ** -0.5)
    nw = randn(k, g=g, dtype=dtype, scale=0.2) + 1
    num_blocks = 2 * rows + 3
    positions = torch.randint(0, 5000, (rows,), generator=g, device="cuda", dtype=torch.int32)
    slots = torch.randperm(num_blocks * bs, generator=g, device="cuda")[:rows].to(torch.int32)
    slots[rows // 2] = -1                                   # a padding row: nothing stored
    caches = [randn(num_blocks, nkv, bs, hd, g=g, dtype=dtype) for _ in range(2)]
    two = [c.clone() for c in caches]
    out = torch.full((rows, n), float("nan"), dtype=dtype, device="cuda")
    kernels.gemv_rope(x, w, nw, positions, slots, caches[0], caches[1], nh, 1e-5, theta, out=out)
    ref = kernels.gemv(x, w, GEMV_NORM, nw, eps=1e-5)
    q = ref[:, :nh * hd].view(rows, nh, hd)
    kk = ref[:, nh * hd:(nh + nkv) * hd].view(rows, nkv, hd)
    v = ref[:, (nh + nkv) * hd:].view(rows, nkv, hd)
    kernels.rope(q, kk, positions, theta, cache=(two[0], two[1], v, slots))
    assert torch.equal(out, ref)
    assert torch.equal(caches[0], two[0]) and torch.equal(caches[1], two[1])
    # float64: rms_norm, projection, rotate_half RoPE
    xd = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * nw.double()
    y = xd @ w.double().T
    cos, sin = rope_cos_sin(positions.cpu().long(), hd, theta, torch.float64)
    cos, sin = cos.cuda(), sin.cuda()
    qd = apply_rope(y[:, :nh * hd].view(rows, nh, hd), cos, sin)
    kd = apply_rope(y[:, nh * hd:(nh + nkv) * hd].view(rows, nkv, hd), cos, sin)
    assert rel_err(out[:, :nh * hd].view(rows, nh, hd), qd) <= TOL
    assert rel_err(out[:, nh * hd:(nh + nkv) * hd].view(rows, nkv, hd), kd) <= TOL
    for m in range(rows):
        if slots[m] < 0:
            continue
        blk, off = divmod(int(slots[m]), bs)
        assert rel_err(caches[0][blk, :, off], kd[m]) <= TOL
        assert rel_err(caches[1][blk, :, off], y[m, (nh + nkv) * hd:].view(nkv, hd)) <= TOL


@pytest.mark.cuda
@needs_gpu
def test_unsupported_shape_raises_naming_the_kernel(kernels):
    g = gen(5)
    q, kc, vc, tables, ctx, qsl = paged_setup([20], [1], 4, 2, 128, 16, torch.bfloat16, g)
    for impl, kernel in (("simt", "decode_kernel"), ("tc", "decode_tc_kernel")):
        with pytest.raises(native.NativeError, match=kernel):
            kernels.paged_attention_decode(q, kc, vc, tables, ctx, qsl, 0.1, 20, partition=24, impl=impl)
    with pytest.raises(native.NativeError, match="float32"):
        kernels.rms_norm(torch.ones(2, 64, device="cuda"), torch.ones(64, device="cuda"), 1e-5)
    with pytest.raises(native.NativeError, match="gemv_kernel"):
        kernels.gemv(torch.ones(9, 64, device="cuda", dtype=torch.bfloat16),
                     torch.ones(32, 64, device="cuda", dtype=torch.bfloat16))
