"""CUDA backend: bf16 weights on the GPU, GEMMs through torch (cuBLAS) or our fused GEMVs (<= 8 rows), our
kernels (native/cuda) for attention (decode on the tensor cores for GQA groups >= 4; prefill on the tensor
cores, the biggest chunks through torch SDPA over their gathered pages), KV write, RoPE, RMSNorm and
SiLU-mul. Decode-only steps of <= 128 sequences replay one CUDA graph per padded batch size
through Backend.forward_step (embedding, every layer, final norm and lm_head inside); so do prefill and
mixed steps of <= prefill_graph_tokens tokens, per (tokens, sequences) bucket, unless a chunk takes the SDPA
route. Logits stay on the GPU (float32) for the engine's sampler."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from engine import native
from engine.backends.base import Backend
from engine.backends.torch_ref import gather_pages
from engine.batch import Batch
from engine.config import ModelConfig
from engine.sampler import row_knobs, upload

DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1}      # PA_CUDA_DTYPE_* in pa.h
PREFILL_MIN_SPAN = 256      # fewest keys a span when the tensor-core prefill kernel splits them (prefill_split)
GEMV_PLAIN, GEMV_NORM, GEMV_SILU, GEMV_NORM_SILU = 0, 1, 2, 3   # PA_CUDA_GEMV_* in pa.h
GEMV_MAX_ROWS = 8
GEMV_PDL, GEMV_DEEP = 1, 2                                          # PA_CUDA_GEMV_* flags in pa.h
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
TC_MIN_GROUP = 4        # GQA group from which decode attention runs on the tensor cores
# From how much work a sequence's prefill chunk goes through torch SDPA (flash / cuDNN on wgmma, over its pages
# gathered into contiguous K/V: sdpa_paged_prefill) instead of our tensor-core paged prefill kernel (mma.sync,
# ~240 TFLOP/s at its best), in FLOP of a whole causal prompt by head_dim; a chunk on a cached prefix needs
# twice as much (prefill_work: SDPA's lower-right-mask path runs ~1.5x slower than its causal one). The route
# costs ~0.1 ms a call whatever the size (gather, mask, launches). Measured on the H200
# (benchmarks/gpu_prefill.py, scripts/ab_prefill.py; results_cuda.md session 7), kernel / route ms: 1B-like
# heads (32 / 8 x 64) 2048 x 2048 0.14 / 0.18, 2048 x 8192 0.58 / 0.63, 8192 x 8192 1.16 / 0.95; Llama-3-8B
# heads (32 / 8 x 128) 1024 x 1024 0.09 / 0.13, 2048 x 2048 0.22 / 0.25, 8192 x 8192 2.4 / 1.2.
PREFILL_SDPA_MIN_FLOP = {64: 64e9, 128: 32e9}


def prefill_work(query_len: int, context_len: int) -> int:
    """A chunk's size against prefill_route_min_work, in query-key pairs: the causal pairs of the chunk
    (query_len x context_len less the upper triangle), halved for a chunk on a cached prefix."""
    pairs = query_len * context_len - query_len * (query_len - 1) // 2
    return pairs if query_len >= context_len else pairs // 2


def prefill_route_min_work(num_heads: int, head_dim: int) -> int:
    """prefill_work from which a chunk goes through SDPA, for these attention heads."""
    return int(PREFILL_SDPA_MIN_FLOP.get(head_dim, PREFILL_SDPA_MIN_FLOP[128]) / (4 * num_heads * head_dim))


# The current stream's cudaStream_t for a device index, and the current device (CUDA builds of torch).
_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_CUDA_DEVICE = getattr(torch._C, "_cuda_getDevice", None)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim of [n, V] (first maximum, as torch.argmax), in two passes over 256-wide
    slices: torch's one-pass kernel puts a whole row on one block (27 us for V = 128256 on the H200)."""
    n, V = x.shape
    if V % 256:
        return x.argmax(-1)
    vals, idx = x.view(n, V // 256, 256).max(-1)                 # [n, V/256]
    j = vals.argmax(-1)                                         # [n]
    return j * 256 + idx.gather(1, j[:, None])[:, 0]


def fused_sample(kernels: "CudaKernels", logits: torch.Tensor, params: list, generators: list,
                 blocks_per_row: int = 0) -> torch.Tensor:
    """engine.sampler.sample_rows' contract in one launch of the fused kernel (CudaKernels.sample_rows):
    each row's knobs and uniform uploaded together, nothing waited for."""
    knobs = upload(row_knobs(params, generators, logits.shape[1]), logits.device)
    return kernels.sample_rows(logits, knobs, blocks_per_row=blocks_per_row)


def sdpa_paged_prefill(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, table: torch.Tensor,
                       ctx: int, scale: float) -> torch.Tensor:
    """Causal attention of one sequence's query chunk q [L, nh, D] -- the last L of its ctx positions -- over
    the first ctx slots of its pages `table` (block ids, >= ceil(ctx / block_size) of them) in key/value_cache
    [blocks, nkv, block_size, D], through F.scaled_dot_product_attention: the pages gathered into contiguous
    [nkv, ctx, D] K and V, GQA by enable_gqa, the causal mask aligned to the last position (a chunk on a
    cached prefix sees the whole prefix). Returns [L, nh, D]."""
    L, bs = q.shape[0], key_cache.shape[2]
    nblk = -(-ctx // bs)
    if L > ctx or table.numel() < nblk:
        raise ValueError(f"sdpa_paged_prefill: {L} query tokens, context {ctx}, {table.numel()} pages of {bs}")
    pages = table[:nblk].long()
    k, v = gather_pages(key_cache, pages, ctx), gather_pages(value_cache, pages, ctx)   # [nkv, ctx, D]
    qh = q.transpose(0, 1)[None]                                   # [1, nh, L, D]
    if L == ctx:
        o = F.scaled_dot_product_attention(qh, k[None], v[None], is_causal=True, scale=scale, enable_gqa=True)
    else:
        from torch.nn.attention.bias import causal_lower_right
        o = F.scaled_dot_product_attention(qh, k[None], v[None], attn_mask=causal_lower_right(L, ctx), scale=scale,
                                           enable_gqa=True)
    return o[0].transpose(0, 1)


@dataclasses.dataclass
class PrefillPlan:
    """A prefill (or mixed) step's attention split: sequences whose prefill_work reaches the backend's
    threshold go through sdpa_paged_prefill (`long`: (first row, end row, context, sequence
    index)); the others form a sub-batch for the paged prefill kernel (its q rows `rows`, and its own
    query_start_loc, context_lens, block_tables on the device), None when there are none."""
    long: list
    rows: torch.Tensor | None = None
    query_start_loc: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    max_query_len: int = 0


def routed(batch: Batch, min_work: int) -> list[bool]:
    """Per sequence of a host Batch, whether its chunk goes through SDPA (prefill_work >= min_work)."""
    if batch.max_query_len * batch.max_context_len < min_work:      # no chunk of this step is that big
        return [False] * batch.num_seqs
    qsl, ctx = batch.query_start_loc.tolist(), batch.context_lens.tolist()
    return [b > a and prefill_work(b - a, c) >= min_work for a, b, c in zip(qsl, qsl[1:], ctx)]


def plan_prefill(batch: Batch, device, min_work: int) -> PrefillPlan | None:
    """The PrefillPlan of a host Batch (None: every sequence stays on the kernel)."""
    sdpa = routed(batch, min_work)
    if not any(sdpa):
        return None
    qsl = batch.query_start_loc.tolist()
    ctx = batch.context_lens.tolist()
    qlens = [b - a for a, b in zip(qsl, qsl[1:])]
    long = [(qsl[i], qsl[i + 1], ctx[i], i) for i, take in enumerate(sdpa) if take]
    short = [i for i, take in enumerate(sdpa) if not take]
    if not short:
        return PrefillPlan(long=long)
    rows = torch.cat([torch.arange(qsl[i], qsl[i + 1]) for i in short])
    sub_qsl = torch.zeros(len(short) + 1, dtype=torch.int32)
    sub_qsl[1:] = torch.tensor([qlens[i] for i in short]).cumsum(0)
    sel = torch.tensor(short)
    return PrefillPlan(long=long, rows=rows.to(device, non_blocking=True),
                       query_start_loc=sub_qsl.to(device, non_blocking=True),
                       context_lens=batch.context_lens[sel].to(device, non_blocking=True),
                       block_tables=batch.block_tables[sel].contiguous().to(device, non_blocking=True),
                       max_query_len=max(qlens[i] for i in short))


# An eager prefill chunk costs ~0.4 ms of host work a layer whatever its size (scripts/profile_prefill.py,
# H200 host), which a graph replay saves; padding a chunk to its bucket costs GEMM time. Graphs are worth it
# while a bucket's GEMMs take no longer than that host work, at ~400 TFLOP/s.
PREFILL_HOST_S_PER_LAYER = 0.4e-3
PREFILL_GEMM_FLOPS = 400e12
PREFILL_GRAPH_MIN_TOKENS = 16


def prefill_graph_default(config: ModelConfig) -> int:
    """The largest power-of-two bucket whose GEMMs take about the host time a graph saves (16 .. 8192)."""
    c = config
    per_token = 2 * c.num_layers * (c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size
                                     + 3 * c.hidden_size * c.intermediate_size)
    tokens = c.num_layers * PREFILL_HOST_S_PER_LAYER * PREFILL_GEMM_FLOPS / per_token
    return 1 << max(PREFILL_GRAPH_MIN_TOKENS.bit_length() - 1, min(13, int(math.log2(max(tokens, 1)))))


def prefill_context_bucket(max_context_len: int, graph_max_context: int) -> int:
    """The context a prefill graph is captured for: a power of two from 2 x PREFILL_MIN_SPAN (up to that the
    prefill kernel never splits its keys) up to graph_max_context."""
    return min(graph_max_context, max(2 * PREFILL_MIN_SPAN, 1 << max(0, max_context_len - 1).bit_length()))


def prefill_context_buckets(longest: int, graph_max_context: int) -> list[int]:
    """Every context bucket (prefill_context_bucket) of contexts up to `longest` tokens."""
    out = [prefill_context_bucket(1, graph_max_context)]
    while out[-1] < min(longest, graph_max_context):
        out.append(min(2 * out[-1], graph_max_context))
    return out


def prefill_graph_bucket(num_tokens: int, num_seqs: int, max_tokens: int) -> tuple[int, int] | None:
    """(tokens, sequences) a prefill graph pads a step to: powers of two from 16 tokens (at least the
    sequences, so every padded sequence's logits row exists) and GRAPH_BATCH_SIZES; None past max_tokens or
    the largest batch size."""
    seqs = next((s for s in GRAPH_BATCH_SIZES if s >= num_seqs), None)
    if seqs is None or num_tokens > max_tokens:
        return None
    tokens = max(PREFILL_GRAPH_MIN_TOKENS, 1 << max(0, num_tokens - 1).bit_length(), seqs)
    return (tokens, seqs) if tokens <= max_tokens else None


LAYER_FIELDS = ("input_norm", "qkv", "o", "post_norm", "gate_up", "down", "key_cache", "value_cache")  # pa.h


@dataclasses.dataclass
class LayerStack:
    """pa_decode_layers_cuda's layer table (int64 device pointers [layers, 8], pa_cuda_decode_layer order),
    the tensors it points into, and the kernel's workspaces (zeroed counters and barrier: the kernel leaves
    them zero)."""
    table: torch.Tensor
    keep: list
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden: int
    inter: int
    max_rows: int
    max_splits: int
    qkv: torch.Tensor
    attn: torch.Tensor
    act: torch.Tensor
    part_o: torch.Tensor
    part_ml: torch.Tensor
    counters: torch.Tensor
    barrier: torch.Tensor


class CudaKernels:
    """Checked wrappers of the pa_*_cuda exports: validate tensors, pass pointers and torch's stream."""

    def __init__(self):
        self.lib = native.load("cuda")
        self.ffi = self.lib.ffi
        self.num_sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        self._partitions: dict[tuple[int, int], int] = {}     # decode_partition's answers
        self._counters: torch.Tensor | None = None            # tc decode: per (seq, head group) arrivals, zero
        # tc decode with split contexts: the last partition block merges (True) or a merge kernel does
        # (False). None: in-kernel while a CUDA graph is being captured (a decode graph's replays mostly
        # fit one partition, where a merge kernel is an empty launch: 1B-like batch 1 +2.6 % tok/s), a
        # merge kernel otherwise (1-1.5 us faster than the last block's merge when the context is split,
        # H200, benchmarks/results_cuda.md session 4).
        self.fused_merge: bool | None = None
        self._argmax_ws: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None   # gemv_argmax partials

    # ---- plumbing ------------------------------------------------------------------------------
    def _p(self, t: torch.Tensor | None):
        return self.ffi.NULL if t is None else self.ffi.cast("void *", t.data_ptr())

    def _stream(self):
        """torch's current stream on the current device, read as inductor reads it: torch.cuda.current_stream()
        builds a Stream object and resolves the device in Python, ~1/4 of an eager prefill chunk's host time
        (scripts/profile_prefill.py, H200 host)."""
        if _RAW_STREAM is not None:
            return self.ffi.cast("void *", _RAW_STREAM(_CUDA_DEVICE()))
        return self.ffi.cast("void *", torch.cuda.current_stream().cuda_stream)

    def _call(self, op: str, *args) -> None:
        self.lib.check(getattr(self.lib.lib, op)(*args, self._stream()), op)

    @staticmethod
    def _check(op: str, name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple | None = None,
               rows: bool = False) -> None:
        """dtype, device and shape; contiguous, or (rows=True) contiguous within each token row."""
        if not isinstance(t, torch.Tensor):
            raise native.NativeError(f"{op}: {name} must be a torch.Tensor")
        if t.device.type != "cuda":
            raise native.NativeError(f"{op}: {name} is on {t.device}, not on the GPU")
        if t.dtype != dtype:
            raise native.NativeError(f"{op}: {name} has dtype {t.dtype}, expected {dtype}")
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise native.NativeError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if rows:
            inner = t[0].is_contiguous() if t.shape[0] > 0 else True
            if not inner or t.stride(0) % 8 or t.data_ptr() % 16:
                raise native.NativeError(f"{op}: {name} rows must be contiguous and 16-byte aligned")
        elif not t.is_contiguous():
            raise native.NativeError(f"{op}: {name} is not contiguous")

    @staticmethod
    def _code(t: torch.Tensor) -> int:
        if t.dtype not in DTYPE_CODES:
            raise native.NativeError(f"CUDA kernels take bfloat16 or float16, got {t.dtype}")
        return DTYPE_CODES[t.dtype]

    # ---- ops -----------------------------------------------------------------------------------
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(x + residual) * weight, x + residual); x, residual [T, hidden]."""
        op, code = "pa_rms_norm_cuda", self._code(x)
        self._check(op, "x", x, x.dtype)
        self._check(op, "weight", weight, x.dtype, (x.shape[-1],))
        if residual is not None:
            self._check(op, "residual", residual, x.dtype, x.shape)
        out = torch.empty_like(x)                                   # [T, hidden]
        total = torch.empty_like(x) if residual is not None else x
        self._call(op, self._p(out), self._p(total) if residual is not None else self.ffi.NULL, self._p(x),
                   self._p(residual), self._p(weight), x.shape[0], x.shape[1], float(eps), code)
        return out, total

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        op = "pa_silu_mul_cuda"
        self._check(op, "gate_up", gate_up, gate_up.dtype)
        inter = gate_up.shape[1] // 2
        out = torch.empty(gate_up.shape[0], inter, dtype=gate_up.dtype, device=gate_up.device)  # [T, I]
        self._call(op, self._p(out), self._p(gate_up), gate_up.shape[0], inter, self._code(gate_up))
        return out

    def rope(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float,
             cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        """In place on q [T, nh, hd] and k [T, nkv, hd]; with cache=(key_cache, value_cache, v,
        slot_mapping) the rotated k and v are also stored in their slots (one launch)."""
        op = "pa_rope_cuda" if cache is None else "pa_rope_write_kv_cuda"
        T, nh, hd = q.shape
        nkv = k.shape[1]
        self._check(op, "q", q, q.dtype, rows=True)
        self._check(op, "k", k, q.dtype, (T, nkv, hd), rows=True)
        self._check(op, "positions", positions, torch.int32, (T,))
        if cache is None:
            self._call(op, self._p(q), self._p(k), self._p(positions), T, nh, nkv, hd, q.stride(0), k.stride(0),
                       float(theta), self._code(q))
            return
        key_cache, value_cache, v, slots = cache
        self._check_cache(op, key_cache, value_cache, q.dtype, nkv, hd)
        self._check(op, "v", v, q.dtype, (T, nkv, hd), rows=True)
        self._check(op, "slot_mapping", slots, torch.int32, (T,))
        self._call(op, self._p(q), self._p(k), self._p(key_cache), self._p(value_cache), self._p(v),
                   self._p(positions), self._p(slots), T, nh, nkv, hd, key_cache.shape[2], q.stride(0),
                   k.stride(0), v.stride(0), float(theta), self._code(q))

    def write_kv(self, key_cache: torch.Tensor, value_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        op = "pa_write_kv_cuda"
        T, nkv, hd = k.shape
        self._check_cache(op, key_cache, value_cache, k.dtype, nkv, hd)
        self._check(op, "k", k, key_cache.dtype, rows=True)
        self._check(op, "v", v, key_cache.dtype, (T, nkv, hd), rows=True)
        self._check(op, "slot_mapping", slot_mapping, torch.int32, (T,))
        self._call(op, self._p(key_cache), self._p(value_cache), self._p(k), self._p(v), self._p(slot_mapping),
                   T, nkv, hd, key_cache.shape[2], k.stride(0), v.stride(0), self._code(k))

    @staticmethod
    def _gemv_flags(pdl: bool, deep: bool) -> int:
        return (GEMV_PDL if pdl else 0) | (GEMV_DEEP if deep else 0)

    def _gemv_checks(self, op: str, x: torch.Tensor, weight: torch.Tensor, mode: int,
                     norm_weight: torch.Tensor | None, residual: torch.Tensor | None) -> None:
        n, k = weight.shape
        self._check(op, "weight", weight, x.dtype)
        self._check(op, "x", x, x.dtype, (x.shape[0], 2 * k if mode == GEMV_SILU else k))
        if norm_weight is not None:
            self._check(op, "norm_weight", norm_weight, x.dtype, (k,))
        if residual is not None:
            self._check(op, "residual", residual, x.dtype, (x.shape[0], n))

    def gemv(self, x: torch.Tensor, weight: torch.Tensor, mode: int = GEMV_PLAIN,
             norm_weight: torch.Tensor | None = None, residual: torch.Tensor | None = None, eps: float = 1e-5,
             out: torch.Tensor | None = None, pdl: bool = False, deep: bool = False) -> torch.Tensor:
        """x' @ weight.T (+ residual) for <= 8 rows; x' = x, rms_norm(x) * norm_weight, or silu(gate) * up.
        GEMV_NORM_SILU: weight = [gate; up], out = silu(x' @ gate.T) * (x' @ up.T) [rows, n / 2].
        pdl: programmatic dependent launch (starts under the previous kernel's tail; see pa.h); deep: twice
        the weight loads in flight a lane on one-row-a-warp launches (PA_CUDA_GEMV_DEEP)."""
        op = "pa_gemv_cuda"
        n, k = weight.shape
        rows = x.shape[0]
        n_out = n // 2 if mode == GEMV_NORM_SILU else n
        self._gemv_checks(op, x, weight, mode, norm_weight, residual)
        if out is None:
            out = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)           # [rows, n_out]
        self._check(op, "out", out, x.dtype, (rows, n_out))
        self._call(op, self._p(out), self._p(x), self._p(weight), self._p(norm_weight), self._p(residual), rows, n,
                   k, mode, float(eps), self._gemv_flags(pdl, deep), self._code(x))
        return out

    def gemv_argmax(self, x: torch.Tensor, weight: torch.Tensor, mode: int = GEMV_PLAIN,
                    norm_weight: torch.Tensor | None = None, eps: float = 1e-5, out: torch.Tensor | None = None,
                    tokens: torch.Tensor | None = None, pdl: bool = False,
                    deep: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """gemv (GEMV_PLAIN or GEMV_NORM, no residual) -> (out [rows, n], tokens [rows] int32 = the first
        argmax of each out row, as torch.argmax picks it), in one launch (pa_gemv_argmax_cuda). Launches
        share this object's partials workspace: keep them on one stream."""
        op = "pa_gemv_argmax_cuda"
        n, k = weight.shape
        rows = x.shape[0]
        if mode not in (GEMV_PLAIN, GEMV_NORM):
            raise native.NativeError(f"{op}: mode {mode} (GEMV_PLAIN or GEMV_NORM only)")
        self._gemv_checks(op, x, weight, mode, norm_weight, None)
        if out is None:
            out = torch.empty(rows, n, dtype=x.dtype, device=x.device)                # [rows, n]
        if tokens is None:
            tokens = torch.empty(rows, dtype=torch.int32, device=x.device)            # [rows]
        self._check(op, "out", out, x.dtype, (rows, n))
        self._check(op, "tokens", tokens, torch.int32, (rows,))
        if self._argmax_ws is None:
            cap = 4 * self.num_sms * GEMV_MAX_ROWS        # blocks a launch can have x rows (pa.h)
            self._argmax_ws = (torch.empty(cap, dtype=torch.float32, device=x.device),
                               torch.empty(cap, dtype=torch.int32, device=x.device),
                               torch.zeros(1, dtype=torch.int32, device=x.device))
        part_v, part_i, arrivals = self._argmax_ws
        self._call(op, self._p(out), self._p(tokens), self._p(part_v), self._p(part_i), self._p(arrivals),
                   part_v.numel(), self._p(x), self._p(weight), self._p(norm_weight), rows, n, k, mode, float(eps),
                   self._gemv_flags(pdl, deep), self._code(x))
        return out, tokens

    def sample_rows(self, logits: torch.Tensor, knobs: torch.Tensor, out: torch.Tensor | None = None,
                    gather_cap: int = -1, blocks_per_row: int = 0) -> torch.Tensor:
        """One sampled token a row of logits [n, vocab] (float32, contiguous) -> int64 [n], in one launch
        (pa_sample_rows_cuda): knobs [n, 5] float64 on the GPU, engine.sampler.row_knobs' columns.
        gather_cap: the kernel's largest in-shared-memory bucket (-1: its default; 0 forces the bisection
        path, for tests). blocks_per_row: 1, 2, 4 or 8 (a cluster a row), 0: the kernel's choice (a cluster
        of 4, the row's passes on 4 SMs, while rows x 4 take at most half the SMs and the vocabulary is
        >= 16384)."""
        op = "pa_sample_rows_cuda"
        self._check(op, "logits", logits, torch.float32)
        if logits.dim() != 2:
            raise native.NativeError(f"{op}: logits must be [rows, vocab], got shape {tuple(logits.shape)}")
        n, vocab = logits.shape
        self._check(op, "knobs", knobs, torch.float64, (n, 5))
        if out is None:
            out = torch.empty(n, dtype=torch.int64, device=logits.device)              # [n]
        self._check(op, "out", out, torch.int64, (n,))
        self._call(op, self._p(out), self._p(logits), vocab, self._p(knobs), n, vocab, int(gather_cap),
                   int(blocks_per_row))
        return out

    def greedy_advance(self, tokens: torch.Tensor, step: torch.Tensor, token_log: torch.Tensor, input_ids: torch.Tensor,
                       positions: torch.Tensor, context_lens: torch.Tensor, slot_mapping: torch.Tensor,
                       block_tables: torch.Tensor, block_size: int) -> None:
        """A multi-step greedy graph's advance (pa_greedy_advance_cuda): token_log[step] = tokens; live rows
        (context_lens > 0) take the token as their next input, one more position and context token and the
        new position's slot; step += 1. Every tensor int32; block_tables [rows, width]."""
        op = "pa_greedy_advance_cuda"
        rows = tokens.shape[0]
        for name, t, shape in (("tokens", tokens, (rows,)), ("step", step, (1,)), ("input_ids", input_ids, (rows,)),
                               ("positions", positions, (rows,)), ("context_lens", context_lens, (rows,)),
                               ("slot_mapping", slot_mapping, (rows,)), ("token_log", token_log, None),
                               ("block_tables", block_tables, None)):
            self._check(op, name, t, torch.int32, shape)
        if token_log.dim() != 2 or token_log.shape[1] != rows or block_tables.dim() != 2 \
                or block_tables.shape[0] != rows:
            raise native.NativeError(f"{op}: token_log must be [steps, {rows}] and block_tables [{rows}, width]")
        self._call(op, self._p(tokens), rows, self._p(step), self._p(token_log), token_log.shape[0], self._p(input_ids),
                   self._p(positions), self._p(context_lens), self._p(slot_mapping), self._p(block_tables),
                   block_tables.shape[1], int(block_size))

    def gemv_rope(self, x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor, positions: torch.Tensor,
                  slot_mapping: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, num_heads: int,
                  eps: float, theta: float, out: torch.Tensor | None = None, pdl: bool = False) -> torch.Tensor:
        """The decode qkv projection with RoPE and the KV write fused (pa_gemv_rope_cuda): out [rows, n] holds
        q and k rotated and v; k and v also land in their slots of the caches."""
        op = "pa_gemv_rope_cuda"
        n, k = weight.shape
        rows = x.shape[0]
        if key_cache.dim() != 4:
            raise native.NativeError(f"{op}: key_cache must be [num_blocks, num_kv_heads, block_size, head_dim]")
        nkv, hd = key_cache.shape[1], key_cache.shape[3]
        if n != (num_heads + 2 * nkv) * hd:
            raise native.NativeError(f"{op}: weight has {n} rows, expected ({num_heads} + 2 x {nkv}) x {hd}")
        self._check(op, "weight", weight, x.dtype)
        self._check(op, "x", x, x.dtype, (rows, k))
        self._check(op, "norm_weight", norm_weight, x.dtype, (k,))
        self._check(op, "positions", positions, torch.int32, (rows,))
        self._check(op, "slot_mapping", slot_mapping, torch.int32, (rows,))
        self._check_cache(op, key_cache, value_cache, x.dtype, nkv, hd)
        if out is None:
            out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
        self._check(op, "out", out, x.dtype, (rows, n))
        self._call(op, self._p(out), self._p(x), self._p(weight), self._p(norm_weight), self._p(positions),
                   self._p(slot_mapping), self._p(key_cache), self._p(value_cache), rows, k, num_heads, nkv, hd,
                   key_cache.shape[2], float(eps), float(theta), int(bool(pdl)), self._code(x))
        return out

    def layer_stack(self, layers: list[dict[str, torch.Tensor]], num_heads: int,
                    max_rows: int = GEMV_MAX_ROWS) -> LayerStack:
        """The device table of pa_decode_layers_cuda (one pa_cuda_decode_layer a layer) and its workspaces.
        layers[i]: input_norm, qkv, o, post_norm, gate_up, down (as pa_gemv_cuda takes them), key_cache,
        value_cache; the stack keeps them alive, so it is valid until they are replaced."""
        op = "pa_decode_layers_cuda"
        if not layers:
            raise native.NativeError(f"{op}: no layers")
        kc = layers[0]["key_cache"]
        dtype, device = kc.dtype, kc.device
        if kc.dim() != 4:
            raise native.NativeError(f"{op}: key_cache must be [num_blocks, num_kv_heads, block_size, head_dim]")
        nkv, hd = kc.shape[1], kc.shape[3]
        hidden = layers[0]["input_norm"].shape[0]
        inter = layers[0]["down"].shape[1]
        qkv_n = (num_heads + 2 * nkv) * hd
        shapes = {"input_norm": (hidden,), "qkv": (qkv_n, hidden), "o": (hidden, num_heads * hd),
                  "post_norm": (hidden,), "gate_up": (2 * inter, hidden), "down": (hidden, inter)}
        ptrs = []
        for i, layer in enumerate(layers):
            for name, shape in shapes.items():
                self._check(op, f"layers[{i}].{name}", layer[name], dtype, shape)
            self._check_cache(op, layer["key_cache"], layer["value_cache"], dtype, nkv, hd)
            ptrs.append([layer[n].data_ptr() for n in LAYER_FIELDS])
        max_splits = max(1, 2 * self.num_sms // nkv)          # the kernel runs <= 2 blocks an SM
        f32 = dict(dtype=torch.float32, device=device)
        return LayerStack(
            table=torch.tensor(ptrs, dtype=torch.int64).to(device), keep=list(layers), num_heads=num_heads,
            num_kv_heads=nkv, head_dim=hd, hidden=hidden, inter=inter, max_rows=max_rows, max_splits=max_splits,
            qkv=torch.empty(max_rows, qkv_n, dtype=dtype, device=device),
            attn=torch.empty(max_rows, num_heads * hd, dtype=dtype, device=device),
            act=torch.empty(max_rows, inter, dtype=dtype, device=device),
            part_o=torch.empty(max_rows * num_heads * max_splits * hd, **f32),
            part_ml=torch.empty(max_rows * num_heads * max_splits * 2, **f32),
            counters=torch.zeros(max_rows * nkv, dtype=torch.int32, device=device),
            barrier=torch.zeros(2, dtype=torch.int32, device=device))

    def decode_layers(self, x: torch.Tensor, stack: LayerStack, positions: torch.Tensor, slot_mapping: torch.Tensor,
                      block_tables: torch.Tensor, context_lens: torch.Tensor, eps: float, theta: float,
                      scale: float, timing: torch.Tensor | None = None) -> torch.Tensor:
        """Every layer of a decode step in one persistent launch (pa_decode_layers_cuda): x [rows, hidden], the
        residual stream of rows one-token sequences (row m = sequence m), is updated in place and returned.
        timing: None, or int64 [5 layers - 1, 3] that the kernel fills with %globaltimer ns per grid barrier
        (first arrival, last arrival, block 0 leaving); see phase_times()."""
        op = "pa_decode_layers_cuda"
        rows = x.shape[0]
        if rows > stack.max_rows:
            raise native.NativeError(f"{op}: {rows} rows, the stack's workspaces hold {stack.max_rows}")
        self._check(op, "x", x, stack.qkv.dtype, (rows, stack.hidden))
        self._check(op, "positions", positions, torch.int32, (rows,))
        self._check(op, "slot_mapping", slot_mapping, torch.int32, (rows,))
        self._check(op, "context_lens", context_lens, torch.int32, (rows,))
        self._check(op, "block_tables", block_tables, torch.int32)
        if block_tables.dim() != 2 or block_tables.shape[0] < rows:
            raise native.NativeError(f"{op}: block_tables shape {tuple(block_tables.shape)} has fewer than {rows} rows")
        block_size = stack.keep[0]["key_cache"].shape[2]
        tp = self.ffi.NULL
        if timing is not None:
            self._check(op, "timing", timing, torch.int64, (5 * stack.table.shape[0] - 1, 3))
            timing[:, 0] = torch.iinfo(torch.int64).max          # atomicMin (unsigned) target
            timing[:, 1:] = 0
            tp = self.ffi.cast("uint64_t *", timing.data_ptr())
        self._call(op, self._p(x), self._p(stack.qkv), self._p(stack.attn), self._p(stack.act),
                   self.ffi.cast("float *", stack.part_o.data_ptr()), self.ffi.cast("float *", stack.part_ml.data_ptr()),
                   self.ffi.cast("int32_t *", stack.counters.data_ptr()),
                   self.ffi.cast("uint32_t *", stack.barrier.data_ptr()), tp,
                   self.ffi.cast("const pa_cuda_decode_layer *", stack.table.data_ptr()), stack.table.shape[0],
                   self._p(positions), self._p(slot_mapping), self._p(block_tables), self._p(context_lens), rows,
                   stack.hidden, stack.inter, stack.num_heads, stack.num_kv_heads, stack.head_dim, block_size,
                   block_tables.shape[1], stack.max_splits, float(eps), float(theta), float(scale), self._code(x))
        return x

    def decode_partition_tc(self, num_seqs: int, num_kv_heads: int, max_context_len: int) -> int:
        """Tokens per block of the tensor-core kernel: at most one block per SM (floor(SMs / units)
        partitions of each (sequence, kv head), at least one), each as long as possible, at least 128
        tokens -- the measured best at every batch x context point of the v5 sweeps
        (benchmarks/results_cuda.md; one block too many costs a second wave: 976 -> 25.6 us vs 1024 -> 23.9
        at batch 1 / 16k)."""
        units = max(1, num_seqs * num_kv_heads)
        splits = max(1, self.num_sms // units)
        return max(128, -(-(-(-max(1, max_context_len) // splits)) // 16) * 16)

    def counters(self, n: int, device) -> torch.Tensor:
        """A zeroed int32 workspace of >= n counters (the tc kernel leaves it zeroed again)."""
        if self._counters is None or self._counters.numel() < n or self._counters.device != device:
            self._counters = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
        return self._counters

    def decode_partition(self, num_seqs: int, num_kv_heads: int, max_context_len: int) -> int:
        """Tokens per thread block. Under 128 (sequence, kv head) units: ~256 blocks (measured best
        on the H200: fewer, longer blocks beat a full wave of short ones). Many: a wave model, time ~
        waves x (partition + 128 tokens of per-block overhead) with 3 resident blocks per SM."""
        units = max(1, num_seqs * num_kv_heads)
        ctx = max(1, max_context_len)
        if (units, ctx) in self._partitions:
            return self._partitions[units, ctx]
        if units < 128:
            splits = -(-256 // units)
            best = (0, max(64, -(-(-(-ctx // splits)) // 64) * 64))
        else:
            slots, best = 3 * self.num_sms, (math.inf, 16)
            for splits in range(1, 513):
                part = -(-(-(-ctx // splits)) // 16) * 16
                if part < 64 and splits > 1:
                    break
                best = min(best, (-(-units * -(-ctx // part) // slots) * (part + 128), part))
        self._partitions[units, ctx] = int(best[1])
        return int(best[1])

    def decode_impl(self, num_heads: int, num_kv_heads: int, num_seqs: int = 1 << 30) -> str:
        """'tc' (tensor cores) for GQA groups >= TC_MIN_GROUP, and for groups of 2-3 when there are fewer
        (sequence, kv head) units than SMs (8-warp tensor-core blocks: SmolLM2's group of 3 at batch 1
        1,839 tok/s against 1,655 on the CUDA-core kernel, H200); else 'simt' (CUDA cores)."""
        group = num_heads // max(1, num_kv_heads)
        small = num_seqs * num_kv_heads < self.num_sms
        return "tc" if group >= TC_MIN_GROUP or (group >= 2 and small) else "simt"

    def paged_attention_decode(self, q, key_cache, value_cache, block_tables, context_lens, query_start_loc,
                               scale: float, max_context_len: int, partition: int | None = None,
                               max_splits: int | None = None, out: torch.Tensor | None = None,
                               impl: str | None = None, fused_merge: bool | None = None) -> torch.Tensor:
        """One query row per sequence -> out [T, nh, hd]; partition/max_splits chosen if not given.
        impl: 'simt' (CUDA cores) or 'tc' (tensor cores); None picks by the GQA group and size (decode_impl).
        fused_merge (tc): the last partition block of a sequence merges the partitions in place of a
        second kernel (None: self.fused_merge's rule)."""
        impl = impl or self.decode_impl(q.shape[1], key_cache.shape[1], context_lens.shape[0])
        if impl not in ("simt", "tc"):
            raise ValueError(f"paged_attention_decode: impl must be 'simt' or 'tc', got {impl!r}")
        op = "pa_paged_attention_decode_cuda" if impl == "simt" else "pa_paged_attention_decode_tc_cuda"
        T, nh, hd = q.shape
        S = context_lens.shape[0]
        self._check_attention(op, q, key_cache, value_cache, block_tables, context_lens, query_start_loc)
        if partition is None:
            choose = self.decode_partition if impl == "simt" else self.decode_partition_tc
            partition = choose(S, key_cache.shape[1], max_context_len)
        if max_splits is None:
            max_splits = max(1, -(-max_context_len // partition))
        out = self._out(op, out, q)
        po = pml = None
        if max_splits > 1:
            po = torch.empty(S, nh, max_splits, hd, dtype=torch.float32, device=q.device)
            pml = torch.empty(S, nh, max_splits, 2, dtype=torch.float32, device=q.device)
        workspace = [self.ffi.cast("float *", po.data_ptr()) if po is not None else self.ffi.NULL,
                     self.ffi.cast("float *", pml.data_ptr()) if pml is not None else self.ffi.NULL]
        if fused_merge is None:
            fused_merge = self.fused_merge
        if fused_merge is None:
            fused_merge = torch.cuda.is_current_stream_capturing()
        if impl == "tc":        # the last partition block merges (no merge launch) unless fused_merge=False
            n = S * nh          # >= S x kv heads x head groups
            workspace.append(self.ffi.cast("int32_t *", self.counters(n, q.device).data_ptr())
                             if fused_merge and max_splits > 1 else self.ffi.NULL)
        self._call(op, self._p(out), *workspace, self._p(q),
                   self._p(key_cache), self._p(value_cache), self._p(block_tables), self._p(context_lens),
                   self._p(query_start_loc), S, nh, key_cache.shape[1], hd, key_cache.shape[2],
                   block_tables.shape[1], partition, max_splits, q.stride(0), float(scale), self._code(q))
        return out

    def prefill_split(self, max_query_len: int, num_seqs: int, num_kv_heads: int, group: int, head_dim: int,
                      max_context_len: int) -> int:
        """Keys a span for the tensor-core prefill kernel (0: no split). A grid of at most half as many blocks
        as SMs -- a short chunk on a long prefix, a chat's follow-up turn -- is cut along the keys into spans
        of at least PREFILL_MIN_SPAN keys, for about two blocks an SM. (H200, gpu_prefill.py: 128 blocks cut
        in 3 were 6 % slower, the partials' round trip costing more than the second block an SM gains.)"""
        tile = self.lib.lib.pa_prefill_tc_tile_tokens_cuda(head_dim, group)
        blocks = -(-max_query_len // tile) * num_kv_heads * num_seqs if tile > 0 else 0
        if blocks == 0 or 2 * blocks > self.num_sms or max_context_len <= 2 * PREFILL_MIN_SPAN:
            return 0
        splits = -(-2 * self.num_sms // blocks)
        keys = -(-max_context_len // splits)                  # a span's share, rounded up to the key tile
        span = max(PREFILL_MIN_SPAN, -(-keys // 64) * 64)
        return span if span < max_context_len else 0

    def paged_attention_prefill(self, q, key_cache, value_cache, block_tables, context_lens, query_start_loc,
                                scale: float, max_query_len: int, out: torch.Tensor | None = None,
                                impl: str | None = None, max_context_len: int | None = None,
                                split_keys: int | None = None) -> torch.Tensor:
        """Causal attention of each sequence's query rows (the last of its context) over its pages -> out
        [T, nh, hd]. impl: 'tc' (tensor cores, the default; GQA groups <= 64) or 'simt' (CUDA cores; <= 32).
        tc only: split_keys cuts the keys into spans of that many (a multiple of 64) merged by a second
        kernel; None: prefill_split's choice. max_context_len must bound every context (default: all the
        block tables hold); the spans cover that many keys."""
        impl = impl or "tc"
        if impl not in ("simt", "tc"):
            raise ValueError(f"paged_attention_prefill: impl must be 'simt' or 'tc', got {impl!r}")
        op = "pa_paged_attention_prefill_cuda" if impl == "simt" else "pa_paged_attention_prefill_tc_cuda"
        T, nh, hd = q.shape
        self._check_attention(op, q, key_cache, value_cache, block_tables, context_lens, query_start_loc)
        out = self._out(op, out, q)
        S, nkv, bs = context_lens.shape[0], key_cache.shape[1], key_cache.shape[2]
        head = (self._p(q), self._p(key_cache), self._p(value_cache), self._p(block_tables), self._p(context_lens),
                self._p(query_start_loc), S, nh, nkv, hd, bs, block_tables.shape[1], int(max_query_len))
        tail = (q.stride(0), float(scale), self._code(q))
        if impl == "simt":
            self._call(op, self._p(out), *head, *tail)
            return out
        cover = block_tables.shape[1] * bs                 # no context is longer than its table
        cover = min(cover, max_context_len) if max_context_len else cover
        if split_keys is None:
            split_keys = self.prefill_split(int(max_query_len), S, nkv, nh // nkv, hd, cover)
        splits = -(-cover // split_keys) if split_keys else 1
        part_o = part_ml = None                            # float32 partials of the spans (split keys)
        if splits < 2:
            split_keys, splits = 0, 1
        else:
            part_o = torch.empty(T * nh * splits * hd, dtype=torch.float32, device=q.device)
            part_ml = torch.empty(T * nh * splits * 2, dtype=torch.float32, device=q.device)
        cast = (lambda t: self.ffi.NULL if t is None else self.ffi.cast("float *", t.data_ptr()))
        self._call(op, self._p(out), cast(part_o), cast(part_ml), *head, int(split_keys), splits, *tail)
        return out

    def _out(self, op, out, q) -> torch.Tensor:
        if out is None:
            return torch.empty(q.shape, dtype=q.dtype, device=q.device)      # [T, nh, hd]
        self._check(op, "out", out, q.dtype, q.shape)
        return out

    def _check_cache(self, op, key_cache, value_cache, dtype, nkv, hd) -> None:
        self._check(op, "key_cache", key_cache, dtype)
        if key_cache.dim() != 4 or key_cache.shape[1] != nkv or key_cache.shape[3] != hd:
            raise native.NativeError(f"{op}: key_cache shape {tuple(key_cache.shape)} is not "
                                     f"[num_blocks, {nkv}, block_size, {hd}]")
        self._check(op, "value_cache", value_cache, dtype, key_cache.shape)

    def _check_attention(self, op, q, key_cache, value_cache, block_tables, context_lens, query_start_loc):
        self._check(op, "q", q, q.dtype, rows=True)
        self._check_cache(op, key_cache, value_cache, q.dtype, key_cache.shape[1], q.shape[2])
        S = context_lens.shape[0]
        self._check(op, "context_lens", context_lens, torch.int32, (S,))
        self._check(op, "query_start_loc", query_start_loc, torch.int32, (S + 1,))
        self._check(op, "block_tables", block_tables, torch.int32)
        if block_tables.dim() != 2 or block_tables.shape[0] < S:
            raise native.NativeError(f"{op}: block_tables shape {tuple(block_tables.shape)} has fewer than {S} rows")


@dataclasses.dataclass
class CudaBatch(Batch):
    """A Batch whose index tensors are int32 on the GPU, plus this backend's per-step plan."""

    partition: int | None = None      # decode attention tokens per block (None: chosen per call)
    max_splits: int | None = None
    graph: "_StepGraph | None" = None
    prefill: PrefillPlan | None = None  # prefill steps: which sequences SDPA takes (plan_prefill)


class _StepGraph:
    """Static int32 inputs of one captured step of `tokens` query rows over `seqs` sequences: ids, positions,
    slots ([tokens]), context_lens, logits rows ([seqs]), query_start_loc ([seqs + 1]), block tables
    ([seqs, width]). A decode graph has one row a sequence (tokens == seqs); its padding rows have slot -1
    and context 0. A prefill graph (prefill=True: chunks of any length, decode rows among them) pads
    with rows of slot -1 that no sequence owns and with sequences of no rows and context 0; its contexts
    are at most `context` tokens (what the prefill kernel's key spans are cut for). With knobs (a sampled
    decode graph) each row's sampling knobs (engine.sampler.row_knobs: float64 [S, 5]) travel in the same
    upload, before the tables; a padding row's are zeros (temperature 0: the argmax)."""

    def __init__(self, size: int, width: int, block_size: int, partition: int | None, max_splits: int | None,
                 device, tokens: int | None = None, prefill: bool = False, context: int | None = None,
                 knobs: bool = False):
        S, T = size, size if tokens is None else tokens
        self.size, self.num_rows, self.width, self.prefill = S, T, width, prefill
        # layout: ids [T] | positions [T] | slots [T] | context_lens [S] | logits rows [S] | qsl [S+1] |
        # (knobs: float64 [S, 5], at an even offset) | tables [S, width]
        self._ctx, self._rows, self._qsl = 3 * T, 3 * T + S, 3 * T + 2 * S
        self._tables = 3 * T + 3 * S + 1
        self._knobs = self._tables + self._tables % 2 if knobs else None
        if knobs:
            self._tables = self._knobs + 10 * S
        self.host = torch.empty(self._tables + S * width, dtype=torch.int32, pin_memory=True)
        self.ints = torch.empty(self.host.shape, dtype=torch.int32, device=device)
        # float64 views of the knobs' words: the host's filled by load, the device's read by the sampling kernel
        k = slice(self._knobs, self._tables) if knobs else None
        self.knobs_host = self.host[k].view(torch.float64).view(S, 5) if knobs else None
        self.knobs = self.ints[k].view(torch.float64).view(S, 5) if knobs else None
        self.copied = torch.cuda.Event()
        self.load_padding()
        d = self.ints
        self.batch = CudaBatch(
            input_ids=d[:T], positions=d[T:2 * T], slot_mapping=d[2 * T:3 * T], context_lens=d[self._ctx:self._rows],
            logits_indices=d[self._rows:self._qsl], query_start_loc=d[self._qsl:self._qsl + S + 1],
            block_tables=d[self._tables:].view(S, width), max_query_len=T if prefill else 1,
            max_context_len=context or width * block_size, block_size=block_size, partition=partition,
            max_splits=max_splits)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None     # what the captured run returned (logits graphs: [S, vocab]
                                                    # float32; tokens graphs: next_tokens), rewritten by each replay
        self.tokens: torch.Tensor | None = None     # greedy graphs: [max_steps, S] int32 chosen tokens
        self.sampled: torch.Tensor | None = None    # sampled graphs: [S] int64, each replay's tokens
        self.step: torch.Tensor | None = None       # greedy graphs: replays since load, on the GPU (int32 [1])
        self.next_tokens: torch.Tensor | None = None    # tokens / greedy graphs: [S] int32, each replay's argmax

    def load_padding(self) -> None:
        """Every row a padding row (slot -1); every sequence of context 0 -- one row each in a decode graph,
        none in a prefill graph; synchronous."""
        S, T, h = self.size, self.num_rows, self.host
        self.copied.synchronize()
        h.zero_()
        h[2 * T:3 * T] = -1
        h[self._rows:self._qsl] = torch.arange(S, dtype=torch.int32)
        if not self.prefill:
            h[self._qsl:self._qsl + S + 1] = torch.arange(S + 1, dtype=torch.int32)
        h[self._tables:] = -1                   # (knobs: zeros, temperature 0 -- padding rows take the argmax)
        self.ints.copy_(h)
        self.copied.record()
        self.copied.synchronize()

    def load(self, batch: Batch, knobs: torch.Tensor | None = None) -> CudaBatch:
        """Copy a batch of n <= size sequences (t <= tokens rows) -- and a sampled graph's knobs [n, 5]
        float64 (None: every row's argmax) -- into the static inputs; returns its view of them."""
        S, T, n, t, L = self.size, self.num_rows, batch.num_seqs, batch.num_tokens, batch.logits_indices.shape[0]
        w = min(self.width, batch.block_tables.shape[1])
        h = self.host.numpy()                   # numpy views: far cheaper per assignment than torch's
        self.copied.synchronize()               # the previous step's copy has left the pinned buffer
        for i, (src, pad) in enumerate(((batch.input_ids, 0), (batch.positions, 0), (batch.slot_mapping, -1))):
            h[i * T:i * T + t] = src.numpy()
            h[i * T + t:(i + 1) * T] = pad
        h[self._ctx:self._ctx + n] = batch.context_lens.numpy()
        h[self._ctx + n:self._rows] = 0
        h[self._rows:self._rows + L] = batch.logits_indices.numpy()
        if self.prefill:                        # sequences past n: no rows
            h[self._qsl:self._qsl + n + 1] = batch.query_start_loc.numpy()
            h[self._qsl + n + 1:self._qsl + S + 1] = t
        h[self._tables:].reshape(S, self.width)[:n, :w] = batch.block_tables[:, :w].numpy()
        if self.knobs_host is not None:
            kn = self.knobs_host.numpy()
            kn[:n] = knobs.numpy() if knobs is not None else 0.0
            kn[n:] = 0.0
        end = self._tables + n * self.width
        self.ints[:end].copy_(self.host[:end], non_blocking=True)
        self.copied.record()
        g = self.batch
        return dataclasses.replace(
            g, input_ids=g.input_ids[:t], positions=g.positions[:t], slot_mapping=g.slot_mapping[:t],
            context_lens=g.context_lens[:n], logits_indices=g.logits_indices[:L],
            query_start_loc=g.query_start_loc[:n + 1], block_tables=g.block_tables[:n],
            max_query_len=batch.max_query_len, max_context_len=batch.max_context_len, graph=self)


class CudaBackend(Backend):
    """bf16 (or fp16) on one GPU; decode-only steps of up to 128 sequences replay a CUDA graph, and so do
    prefill / mixed steps of up to prefill_graph_tokens tokens."""

    name = "cuda"
    supports_async = True                       # decode steps pipelined on the device argmax (Engine.step)
    # Prompt tokens a step: a chunk costs ~0.4 ms of host work a layer whatever its size (eager prefill), so
    # 512-token chunks put an 8192-token prompt's first token at 195 ms with SmolLM2 against 18 ms in one
    # chunk and 34 ms for HF's forward (benchmarks/gpu_ttft.py, H200, results_cuda.md session 7); 8192 is
    # also what vLLM takes for its server on GPUs of >= 70 GB.
    default_max_batched_tokens = 8192
    # The largest decode graph: a batch-128 step is ~3x the tokens a second of batch 32 (SmolLM2 79-92k
    # against 28k tok/s, gpu_e2e.py) for one ~1.6 ms step.
    default_max_num_seqs = GRAPH_BATCH_SIZES[-1]

    def __init__(self, config: ModelConfig, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
                 use_cuda_graphs: bool = True, graph_max_context: int = 8192, gemv_max_rows: int = GEMV_MAX_ROWS,
                 use_pdl: bool | tuple | None = None, decode_impl: str | None = None, fuse_silu: bool = True,
                 fuse_rope: bool = True, fuse_layers: bool = False, deep_gemv: tuple | None = None,
                 prefill_sdpa_min_work: int | None = None, prefill_impl: str | None = None,
                 prefill_graph_tokens: int | None = None):
        super().__init__(config)
        if not torch.cuda.is_available():
            raise native.NativeError("backend 'cuda' needs a CUDA GPU; none is visible to torch")
        if dtype not in DTYPE_CODES:
            raise ValueError(f"CudaBackend dtype must be bfloat16 or float16, got {dtype}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.kernels = CudaKernels()
        self.use_cuda_graphs = use_cuda_graphs
        self.gemv_max_rows = min(gemv_max_rows, GEMV_MAX_ROWS)   # decode graphs of <= this many rows: GEMV path
        # GEMVs as programmatic dependent launches (pa.h): True, False, or the names of those that are
        # ("qkv", "o", "gate_up", "down", "lm_head"). None: all for hidden <= 1024, where the H200 runs
        # SmolLM2's batch-1 step 7-8 % faster with them; above, all but lm_head (1B-like with down and o
        # deep: 1,188 tok/s against 1,173 without PDL on down; without deep, PDL slowed down, which is
        # why session 4 left it out; benchmarks/results_cuda.md session 5).
        self.use_pdl = (True if config.hidden_size <= 1024 else ("qkv", "o", "gate_up", "down")) \
            if use_pdl is None else use_pdl
        # GEMVs launched with twice the weight loads in flight a lane (PA_CUDA_GEMV_DEEP: one-row-a-warp
        # grids of at most two blocks an SM); names as use_pdl takes them. None: down and o (H200, GPU
        # multi-step batch 1: SmolLM2 2,205 against 2,120 tok/s, 1B-like with down as a PDL launch 1,182
        # against 1,169; results_cuda.md session 5).
        self.deep_gemv = ("down", "o") if deep_gemv is None else tuple(deep_gemv)
        for option, value in (("use_pdl", self.use_pdl), ("deep_gemv", self.deep_gemv)):
            self._gemv_option(option, value, "")       # unknown GEMV names fail here, not at the first step
        self.fuse_silu = fuse_silu              # GEMV path: SiLU-mul in gate_up's epilogue, down a plain GEMV
        self.fuse_rope = fuse_rope              # GEMV path: RoPE and the KV write in qkv's epilogue
        # GEMV path: every layer in one persistent launch (pa_decode_layers_cuda, both fusions above built
        # in). Off unless asked: slower than the five launches a layer on the H200 (decode_layers.cu).
        supported = (config.head_dim in (64, 128) and config.num_heads // config.num_kv_heads <= 8
                     and config.hidden_size % 8 == 0 and config.intermediate_size % 8 == 0)
        if fuse_layers and not supported:
            raise ValueError("fuse_layers: pa_decode_layers_cuda takes head_dim 64 or 128 and GQA groups <= 8")
        self.fuse_layers = bool(fuse_layers)
        self._layer_stack: LayerStack | None = None       # built on first use; reset with weights or caches
        self.decode_impl = decode_impl          # 'simt' / 'tc' decode attention; None: by GQA group
        # prefill_work of a sequence's chunk from which prefill attention goes through SDPA
        # (sdpa_paged_prefill); 1: every chunk; a number past any chunk: none
        self.prefill_sdpa_min_work = prefill_route_min_work(config.num_heads, config.head_dim) \
            if prefill_sdpa_min_work is None else int(prefill_sdpa_min_work)
        self.prefill_impl = prefill_impl        # the paged prefill kernel: 'tc' / 'simt'; None: 'tc'
        self.sample_blocks_per_row = 0          # the sampling kernel's blocks a row (0: its choice; 1: one)
        self.graph_max_context = min(graph_max_context, config.max_position_embeddings)
        # Prefill (and mixed) steps of up to this many tokens replay a graph too, padded to a power of two
        # (prefill_graph_bucket); 0: none. None: prefill_graph_default(config).
        self.prefill_graph_tokens = prefill_graph_default(config) if prefill_graph_tokens is None \
            else int(prefill_graph_tokens)
        self.scale = config.head_dim ** -0.5
        self.w: dict[str, torch.Tensor] = {}
        self.key_caches: list[torch.Tensor] = []
        self.value_caches: list[torch.Tensor] = []
        self._graphs: dict[tuple, _StepGraph] = {}                  # decode: (size, split, kind)
        self._prefill_graphs: dict[tuple[int, int, int], _StepGraph] = {}   # (tokens, sequences, context)
        self._prefill_pool = None       # one memory pool for every prefill graph (they replay one at a time)
        self._prefill_logits: torch.Tensor | None = None    # [128, vocab] float32: every prefill graph's logits
        self._staging: torch.Tensor | None = None       # pinned int32, eager steps' index upload
        self._staged = None                              # event: the staging buffer's last copy finished
        self._logit_bufs: list[torch.Tensor | None] = [None, None]
        self._logit_turn = 0

    # ---- set-up --------------------------------------------------------------------------------
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.w = {n: t.to(self.device, self.dtype).contiguous() for n, t in weights.items() if n != "lm_head"}
        tied = weights["lm_head"] is weights["embed"]
        self.w["lm_head"] = self.w["embed"] if tied else weights["lm_head"].to(self.device, self.dtype).contiguous()
        self.reset_graphs()

    def reset_graphs(self) -> None:
        """Drop every captured graph (and the layer table): after new weights or caches, or after changing
        an option a graph has baked in (prefill_impl, decode_impl, use_pdl, ...)."""
        self._graphs.clear()
        self._prefill_graphs.clear()
        self._prefill_pool = None       # the old pool goes with its graphs: capturing into it again fails
        self._prefill_logits = None
        self._layer_stack = None

    # Share of the card's memory the process may fill when the KV cache is sized for it (vLLM's default
    # gpu_memory_utilization): what is left goes to the driver, other processes and fragmentation.
    gpu_memory_utilization = 0.9

    def default_kv_cache_bytes(self, max_batched_tokens: int, max_num_seqs: int) -> int:
        """The KV cache when none is asked for: gpu_memory_utilization of the card, less what is in use
        (weights, the CUDA context, other processes; memory torch keeps cached counts as free -- Engine
        releases the backend's earlier cache before asking), less what steps need besides: twice an eager step's activations
        of max_batched_tokens tokens (eager, and the prefill graphs' pool), the sampler's float32 logits,
        the decode graphs' own logits buffers and the one the prefill graphs share, plus 1 GiB for workspaces
        and fragmentation."""
        c = self.config
        free, total = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        used = total - free - cached
        width = 2 if self.dtype in (torch.bfloat16, torch.float16) else 4
        per_token = (6 * c.hidden_size + 2 * c.q_size + 2 * c.kv_size + 3 * c.intermediate_size) * width
        top = next((s for s in GRAPH_BATCH_SIZES if s >= max_num_seqs), max_num_seqs)
        graph_rows = 4 * sum(s for s in GRAPH_BATCH_SIZES if s <= top)      # 2 kinds x split or not
        logit_rows = 6 * max_num_seqs + 4 * graph_rows + 4 * GRAPH_BATCH_SIZES[-1]   # x bytes a row and value
        reserve = 2 * max_batched_tokens * per_token + logit_rows * c.vocab_size + 2**30
        budget = int(self.gpu_memory_utilization * total - used - reserve)
        if budget < 64 * 2**20:
            raise RuntimeError(
                f"CudaBackend: no room for a KV cache: {total / 2**30:.1f} GiB on the GPU, {used / 2**30:.1f} in use "
                f"(weights, CUDA context, other processes), {reserve / 2**30:.1f} kept for activations; set "
                f"kv_cache_mb, or lower max_batched_tokens / max_num_seqs")
        return budget

    def release_kv_cache(self) -> None:
        """Drop the pools, the graphs that point into them, and torch's cached copy of that memory: a new
        backend sizing its cache to the GPU (default_kv_cache_bytes) would otherwise find ~90 % of it taken."""
        self.key_caches, self.value_caches = [], []
        self.reset_graphs()
        torch.cuda.empty_cache()

    def kv_bytes_per_block(self, block_size: int) -> int:
        c = self.config
        return 2 * c.num_layers * c.num_kv_heads * block_size * c.head_dim * self.dtype.itemsize

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        if block_size & (block_size - 1):
            raise ValueError(f"CudaBackend: block_size must be a power of two, got {block_size}")
        c = self.config
        shape = (num_blocks, c.num_kv_heads, block_size, c.head_dim)     # per layer, K and V
        self.key_caches, self.value_caches = [], []     # the old caches go before the new ones come
        self.reset_graphs()                             # (their graphs point into them)
        self.key_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.num_layers)]
        self.value_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.num_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        idx = torch.tensor(pairs, dtype=torch.int64).to(self.device, non_blocking=True)
        for cache in self.key_caches + self.value_caches:
            cache[idx[:, 1]] = cache[idx[:, 0]]

    def prepare(self, batch: Batch) -> CudaBatch:
        """Upload the index tensors once (one copy from pinned memory); steps a graph takes (_graph_for) go
        into its static inputs instead."""
        graph = self._graph_for(batch)
        if graph is not None:
            return self._load_graph(graph, batch)
        parts = [batch.input_ids, batch.positions, batch.slot_mapping, batch.query_start_loc, batch.context_lens,
                 batch.logits_indices, batch.block_tables.reshape(-1)]
        sizes = [p.numel() for p in parts]
        total = sum(sizes)
        if self._staging is None or self._staging.numel() < total:
            self._staging = torch.empty(max(total, 4096), dtype=torch.int32, pin_memory=True)
            self._staged = None
        if self._staged is not None:
            self._staged.synchronize()
        torch.cat([p.to(torch.int32) for p in parts], out=self._staging[:total])
        ints = self._staging[:total].to(self.device, non_blocking=True)
        self._staged = torch.cuda.Event()
        self._staged.record()
        ids, pos, slots, qsl, ctx, rows, tables = ints.split(sizes)
        if batch.device_input_ids is not None:
            ids = batch.device_input_ids.to(torch.int32)
        plan = plan_prefill(batch, self.device, self.prefill_sdpa_min_work)
        return CudaBatch(input_ids=ids, positions=pos, slot_mapping=slots, query_start_loc=qsl, context_lens=ctx,
                         block_tables=tables.view(batch.block_tables.shape), logits_indices=rows,
                         max_query_len=batch.max_query_len, max_context_len=batch.max_context_len,
                         block_size=batch.block_size, prefill=plan)

    # ---- ops -----------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.w["embed"])

    def rms_norm(self, x, name, residual=None):
        return self.kernels.rms_norm(x, self.w[name], self.config.rms_norm_eps, residual)

    def linear(self, x, name):
        return F.linear(x, self.w[name])

    def rope(self, q, k, positions):
        self.kernels.rope(q, k, positions, self.config.rope_theta)
        return q, k

    def write_kv(self, layer, k, v, batch):
        self.kernels.write_kv(self.key_caches[layer], self.value_caches[layer], k, v, batch.slot_mapping)

    def paged_attention(self, layer, q, batch):
        kc, vc = self.key_caches[layer], self.value_caches[layer]
        args = (q, kc, vc, batch.block_tables, batch.context_lens, batch.query_start_loc, self.scale)
        if batch.max_query_len == 1 and batch.num_tokens == batch.num_seqs:
            return self.kernels.paged_attention_decode(*args, batch.max_context_len, getattr(batch, "partition", None),
                                                       getattr(batch, "max_splits", None), impl=self.decode_impl)
        plan = getattr(batch, "prefill", None)
        if plan is None:
            return self.kernels.paged_attention_prefill(*args, batch.max_query_len, impl=self.prefill_impl,
                                                        max_context_len=batch.max_context_len)
        out = torch.empty_like(q)
        for r0, r1, ctx, s in plan.long:           # long chunks: SDPA (tensor cores) over gathered pages
            out[r0:r1] = sdpa_paged_prefill(q[r0:r1], kc, vc, batch.block_tables[s], ctx, self.scale)
        if plan.rows is not None:                 # the rest: the paged kernel on their own sub-batch
            out[plan.rows] = self.kernels.paged_attention_prefill(
                q[plan.rows], kc, vc, plan.block_tables, plan.context_lens, plan.query_start_loc, self.scale,
                plan.max_query_len, impl=self.prefill_impl, max_context_len=batch.max_context_len)
        return out

    def silu_mul(self, gate_up):
        return self.kernels.silu_mul(gate_up)

    def forward_layer(self, layer, h, residual, batch):
        """Our own layer (RoPE and KV write fused into one launch)."""
        return self._layer(layer, h, residual, batch)

    def forward_step(self, batch: Batch) -> torch.Tensor | None:
        """A step that prepare() gave a CUDA graph (decode, or prefill / mixed): replay it (embedding, every
        layer, final norm and lm_head inside) -> float32 logits [len(logits_indices), vocab] on the GPU;
        None: model.py composes."""
        g = getattr(batch, "graph", None)
        if g is None:
            return None
        g.graph.replay()
        return g.logits[:batch.logits_indices.shape[0]].clone()   # the next replay overwrites g.logits

    @torch.inference_mode()
    def forward_tokens(self, batch: Batch) -> torch.Tensor | None:
        """A greedy decode step in one graph replay, the argmax included (fused into the lm_head GEMV at <= 8
        rows) -> int32 tokens [num_seqs] on the GPU, or None when no graph fits (use forward + argmax).
        The tokens live in the graph's static buffer until its next replay: read or copy them before then
        (the pipelined engine copies them to the host and into the next step's inputs, stream-ordered)."""
        if batch.logits_indices.shape[0] != batch.num_seqs:
            return None
        g = self._graph_for(batch, kind="tokens")
        if g is None:
            return None
        self._load_graph(g, batch)
        g.graph.replay()
        return g.next_tokens[:batch.num_seqs]

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Two passes over 256-wide slices (argmax_rows): 8 us for a 128k vocabulary on the H200, where
        torch's one-pass argmax takes 27."""
        return argmax_rows(logits) if logits.is_cuda and logits.dim() == 2 else logits.argmax(-1)

    def sample(self, logits: torch.Tensor, params: list, generators: list) -> torch.Tensor:
        """Every sampled row in one launch (CudaKernels.sample_rows: no sort of the rows, ~20 torch launches
        fewer than sample_rows): the same tokens as sample_rows on the same logits and generator states,
        but for a draw within rounding of a CDF step."""
        if not logits.is_cuda:
            return super().sample(logits, params, generators)
        return fused_sample(self.kernels, logits, params, generators, self.sample_blocks_per_row)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """float32 [n, vocab] on the GPU: the engine's sampler decides greedy rows there."""
        return self.logits_device(h)

    def logits_host(self, h: torch.Tensor) -> torch.Tensor:
        """float32 [n, vocab] in pinned CPU memory; valid until the next-but-one logits_host() call."""
        out = self.logits_device(h)
        n = out.numel()
        turn = self._logit_turn = 1 - self._logit_turn
        buf = self._logit_bufs[turn]
        if buf is None or buf.numel() < n:
            buf = self._logit_bufs[turn] = torch.empty(max(n, 1 << 20), dtype=torch.float32, pin_memory=True)
        host = buf[:n].view(out.shape)
        host.copy_(out, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        return host

    def logits_device(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [n, vocab] on the GPU (for callers that sample there); into out when given."""
        if 0 < h.shape[0] <= self.gemv_max_rows:
            logits = self.kernels.gemv(h.contiguous(), self.w["lm_head"], pdl=self._pdl("lm_head"))
        else:
            logits = F.linear(h, self.w["lm_head"])
        return logits.float() if out is None else out.copy_(logits)

    @torch.inference_mode()
    def sample_step(self, batch: Batch, params: list, generators: list) -> torch.Tensor | None:
        """A decode step of unpenalised rows without logprobs in one graph replay, the fused sampling kernel
        inside (greedy rows take the argmax there) -> int64 tokens [num_seqs] on the GPU, or None when no
        graph fits (nothing drawn then). The knobs and uniforms (row_knobs) travel in the graph's one
        upload. The tokens live in the graph's static buffer until its next replay."""
        if batch.logits_indices.shape[0] != batch.num_seqs:
            return None
        g = self._graph_for(batch, kind="sampled")
        if g is None:
            return None
        self._load_graph(g, batch, row_knobs(params, generators, self.config.vocab_size))
        g.graph.replay()
        return g.sampled[:batch.num_seqs]

    @torch.inference_mode()
    def greedy_steps(self, batch: Batch, num_steps: int) -> torch.Tensor:
        """Multi-step greedy decode on the GPU: num_steps graph replays, each feeding its argmax to the next,
        with no host round trip in between. batch is a decode step; its block tables must already hold
        context_lens + num_steps - 1 positions. Returns the chosen tokens [num_steps, num_seqs] (CPU)."""
        g = self._graph_for(batch, kind="greedy")
        if g is None:
            raise ValueError("greedy_steps needs a decode-only batch that fits a CUDA graph")
        if num_steps > g.tokens.shape[0] or batch.max_context_len + num_steps - 1 > self.graph_max_context:
            raise ValueError(f"greedy_steps: {num_steps} steps do not fit the graph's buffers")
        g.load(batch)
        g.step.zero_()
        for _ in range(num_steps):
            g.graph.replay()
        return g.tokens[:num_steps, :batch.num_seqs].cpu()

    # ---- internals -----------------------------------------------------------------------------
    def _layer(self, i: int, h: torch.Tensor, residual: torch.Tensor | None, batch: CudaBatch):
        c = self.config
        x, residual = self.rms_norm(h, f"layers.{i}.input_norm", residual)
        qkv = self.linear(x, f"layers.{i}.qkv")                                # [T, q_size + 2 kv_size]
        T = qkv.shape[0]
        q = qkv[:, :c.q_size].view(T, c.num_heads, c.head_dim)                 # views, row stride = qkv's
        k = qkv[:, c.q_size:c.q_size + c.kv_size].view(T, c.num_kv_heads, c.head_dim)
        v = qkv[:, c.q_size + c.kv_size:].view(T, c.num_kv_heads, c.head_dim)
        self.kernels.rope(q, k, batch.positions, c.rope_theta,
                          cache=(self.key_caches[i], self.value_caches[i], v, batch.slot_mapping))
        attn = self.paged_attention(i, q, batch)                               # [T, nh, hd]
        h = self.linear(attn.view(T, c.q_size), f"layers.{i}.o")
        x, residual = self.rms_norm(h, f"layers.{i}.post_norm", residual)
        h = self.linear(self.silu_mul(self.linear(x, f"layers.{i}.gate_up")), f"layers.{i}.down")
        return h, residual

    def _graph_partition(self, size: int) -> int:
        return 256 if size <= 4 else 512 if size <= 16 else 1024 if size <= 64 else 2048

    GRAPH_KINDS = ("logits", "tokens", "sampled", "greedy")

    @staticmethod
    def _load_graph(g: _StepGraph, batch: Batch, knobs: torch.Tensor | None = None) -> CudaBatch:
        """The batch (and a sampled graph's knobs) into g's static inputs; device input ids copied after the
        host ids, on the same stream."""
        loaded = g.load(batch, knobs)
        if batch.device_input_ids is not None:
            loaded.input_ids[:batch.num_seqs].copy_(batch.device_input_ids)
        return loaded

    def _graph_for(self, batch: Batch, kind: str = "logits") -> _StepGraph | None:
        """The captured graph for this step's padded size (capturing it the first time), or None. kind:
        'logits' (forward_step), 'tokens' (forward_tokens), 'sampled' (sample_step) or 'greedy' (greedy_steps);
        prefill and mixed steps (_prefill_graph_for) only replay 'logits' graphs."""
        if kind not in self.GRAPH_KINDS:
            raise ValueError(f"graph kind must be one of {self.GRAPH_KINDS}, got {kind!r}")
        if not self.use_cuda_graphs or not self.key_caches:
            return None
        if batch.max_query_len != 1 or batch.num_tokens != batch.num_seqs:
            return self._prefill_graph_for(batch) if kind == "logits" else None
        n = batch.num_seqs
        size = next((s for s in GRAPH_BATCH_SIZES if s >= n), None)
        if size is None or batch.max_context_len > self.graph_max_context:
            return None
        split = kind == "greedy" or batch.max_context_len > self._graph_partition(size)
        return self._decode_graph((size, split, kind))

    def _decode_graph(self, key: tuple[int, bool, str]) -> _StepGraph:
        """The decode graph of key (size, split, kind), captured the first time."""
        if key not in self._graphs:
            size, split, kind = key
            self._graphs[key] = self._capture(size, self._graph_partition(size), split, kind)
        return self._graphs[key]

    def _prefill_graph_for(self, batch: Batch) -> _StepGraph | None:
        """The prefill graph of this step's (tokens, sequences, context) bucket, or None: too many tokens or
        sequences, a context past graph_max_context, or a chunk the SDPA route takes (its shapes follow
        the context: plan_prefill)."""
        bucket = prefill_graph_bucket(batch.num_tokens, batch.num_seqs, self.prefill_graph_tokens)
        if bucket is None or batch.max_context_len > self.graph_max_context or batch.device_input_ids is not None \
                or batch.logits_indices.shape[0] > bucket[1]:
            return None
        if any(routed(batch, self.prefill_sdpa_min_work)):
            return None
        return self._prefill_graph((*bucket, self._prefill_context_key(*bucket, batch.max_context_len)))

    def _prefill_graph(self, key: tuple[int, int, int]) -> _StepGraph:
        """The prefill graph of key (tokens, sequences, context), captured the first time."""
        if key not in self._prefill_graphs:
            tokens, seqs, context = key
            self._prefill_graphs[key] = self._capture(seqs, None, False, "logits", tokens=tokens, context=context)
        return self._prefill_graphs[key]

    def _prefill_context_key(self, tokens: int, seqs: int, max_context_len: int) -> int:
        """The context a (tokens, seqs) prefill graph is captured for. Only a grid the kernel cuts into key
        spans (prefill_split: a short chunk on a long prefix) depends on it; every other grid is one graph
        for any context up to graph_max_context."""
        if not self._prefill_graph_splits(tokens, seqs):
            return self.graph_max_context
        return prefill_context_bucket(max_context_len, self.graph_max_context)

    def _prefill_graph_splits(self, tokens: int, seqs: int) -> bool:
        """Whether a (tokens, seqs) prefill graph's kernel cuts its keys into spans at the longest context."""
        c = self.config
        return self.prefill_impl != "simt" and bool(self.kernels.prefill_split(
            tokens, seqs, c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim, self.graph_max_context))

    def graph_keys(self, max_num_seqs: int, max_batched_tokens: int,
                   max_model_len: int) -> tuple[list[tuple], list[tuple]]:
        """Every decode graph key (size, split, kind) and prefill graph key (tokens, sequences, context) that
        an Engine's steps -- at most max_num_seqs sequences and max_batched_tokens tokens (decode rows
        included: the scheduler's budget counts them), contexts up to max_model_len -- can replay."""
        if not self.use_cuda_graphs:
            return [], []
        top = next((s for s in GRAPH_BATCH_SIZES if s >= max_num_seqs), GRAPH_BATCH_SIZES[-1])
        sizes = [s for s in GRAPH_BATCH_SIZES if s <= top]
        longest = min(max_model_len, self.graph_max_context)
        decode = [(s, split, kind) for s in sizes for split in (False, True)
                  if not split or longest > self._graph_partition(s) for kind in ("logits", "tokens", "sampled")]
        prefill, tokens = [], PREFILL_GRAPH_MIN_TOKENS
        most = min(self.prefill_graph_tokens, max_batched_tokens)      # the budget counts decode rows too
        while tokens < 2 * most:
            for seqs in sizes:
                if seqs <= tokens:
                    contexts = prefill_context_buckets(longest, self.graph_max_context) \
                        if self._prefill_graph_splits(tokens, seqs) else [self.graph_max_context]
                    prefill += [(tokens, seqs, c) for c in contexts]
            tokens *= 2
        return decode, prefill

    def warmup(self, max_num_seqs: int, max_batched_tokens: int, max_model_len: int) -> int:
        """Capture every graph graph_keys() names now, so that no step of a running server stops to capture
        one (on the H200 a capture costs about three eager steps: a step of a new shape took 30-80 ms in
        benchmarks/gpu_serve.py's lazy runs). Largest prefill graphs first, so the smaller ones reuse their
        pool. Returns how many graphs were captured."""
        if not self.key_caches:
            raise RuntimeError("warmup: allocate the KV cache first")
        decode, prefill = self.graph_keys(max_num_seqs, max_batched_tokens, max_model_len)
        before = len(self._graphs) + len(self._prefill_graphs)
        for key in sorted(prefill, reverse=True):
            self._prefill_graph(key)
        for key in decode:
            self._decode_graph(key)
        return len(self._graphs) + len(self._prefill_graphs) - before

    def _capture(self, size: int, partition: int | None, split: bool, kind: str,
                 tokens: int | None = None, context: int | None = None) -> _StepGraph:
        """A graph of `size` sequences: a decode step, or with tokens a prefill step of that many rows and
        contexts of at most `context` tokens (captured into the prefill graphs' shared memory pool)."""
        width = -(-self.graph_max_context // self.block_size)
        max_splits = None if partition is None else -(-self.graph_max_context // partition) if split else 1
        prefill = tokens is not None
        g = _StepGraph(size, width, self.block_size, partition, max_splits, self.device, tokens, prefill, context,
                       knobs=kind == "sampled")
        if kind in ("tokens", "greedy"):
            g.next_tokens = torch.zeros(size, dtype=torch.int32, device=self.device)
        if kind == "sampled":
            g.sampled = torch.zeros(size, dtype=torch.int64, device=self.device)
        if kind == "greedy":
            g.tokens = torch.zeros(1024, size, dtype=torch.int32, device=self.device)
            g.step = torch.zeros(1, dtype=torch.int32, device=self.device)
        run = {"logits": self._run_step, "tokens": self._run_tokens, "sampled": self._run_sampled,
               "greedy": self._run_greedy}[kind]
        if prefill and self._prefill_logits is None:
            self._prefill_logits = torch.empty(GRAPH_BATCH_SIZES[-1], self.config.vocab_size, dtype=torch.float32,
                                               device=self.device)
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):                       # warm-up: cuBLAS picks its kernels, workspaces exist
                run(g)
        torch.cuda.current_stream().wait_stream(side)
        g.load_padding()                             # the warm-up of a greedy graph advanced the inputs
        g.graph = torch.cuda.CUDAGraph()
        if prefill and self._prefill_pool is None:
            self._prefill_pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(g.graph, pool=self._prefill_pool if prefill else None), torch.inference_mode():
            g.logits = run(g)
        return g

    def _run_layers(self, g: _StepGraph):
        """All layers of a graph step on its static inputs -> (h, residual); residual None on the GEMV path
        (decode steps of <= gemv_max_rows rows), where h is already the residual stream."""
        batch = g.batch
        h, residual = F.embedding(batch.input_ids, self.w["embed"]), None
        gemv = batch.num_tokens <= self.gemv_max_rows
        if gemv and self.fuse_layers:
            c = self.config
            h = self.kernels.decode_layers(h, self.layer_stack(), batch.positions, batch.slot_mapping,
                                           batch.block_tables, batch.context_lens, c.rms_norm_eps, c.rope_theta,
                                           self.scale)
            return h, None
        if gemv:
            for i in range(self.config.num_layers):
                h = self._layer_gemv(i, h, batch)
            return h, None
        for i in range(self.config.num_layers):
            h, residual = self._layer(i, h, residual, batch)
        return h, residual

    def _final_norm_lm_head(self, g: _StepGraph, pick_rows: bool, tokens: torch.Tensor | None = None):
        """The final norm and lm_head of a graph step: float32 logits of the rows logits_indices names
        (pick_rows; else of every row in order); with tokens (every row) also their argmax into tokens,
        fused into the lm_head GEMV on the GEMV path (the logits then stay bf16). A prefill graph writes its
        logits into the one buffer all prefill graphs share (they replay one at a time, and a step's
        logits are used before the next step launches, as with a graph replayed twice in a row)."""
        h, residual = self._run_layers(g)
        out = self._prefill_logits[:g.size] if g.prefill and pick_rows and tokens is None else None
        if pick_rows:
            rows = g.batch.logits_indices.long()
            h = h.index_select(0, rows)
            residual = residual.index_select(0, rows) if residual is not None else None
        if residual is None:                         # GEMV path: h is the residual stream; norm fused
            args = (h, self.w["lm_head"], GEMV_NORM, self.w["norm"])
            kw = dict(eps=self.config.rms_norm_eps, pdl=self._pdl("lm_head"), deep=self._deep("lm_head"))
            if tokens is not None:
                return self.kernels.gemv_argmax(*args, tokens=tokens, **kw)[0]
            logits = self.kernels.gemv(*args, **kw)
            return logits.float() if out is None else out.copy_(logits)
        h, _ = self.rms_norm(h, "norm", residual)
        logits = self.logits_device(h, out)
        if tokens is not None:
            tokens.copy_(argmax_rows(logits))
        return logits

    def _run_step(self, g: _StepGraph, pick_rows: bool = True) -> torch.Tensor:
        """A whole decode step on the graph's static inputs -> float32 logits [B, vocab] of the rows
        logits_indices names (pick_rows; else of every row in order)."""
        return self._final_norm_lm_head(g, pick_rows)

    def _run_tokens(self, g: _StepGraph) -> torch.Tensor:
        """A whole decode step -> its greedy tokens [B] (int32, g.next_tokens)."""
        self._final_norm_lm_head(g, False, g.next_tokens)
        return g.next_tokens

    def _run_sampled(self, g: _StepGraph) -> torch.Tensor:
        """A whole decode step -> its tokens [B] (int64, g.sampled): the fused sampling kernel on every row's
        float32 logits with the static knobs (padding rows: temperature 0, the argmax)."""
        return self.kernels.sample_rows(self._final_norm_lm_head(g, False), g.knobs, out=g.sampled,
                                        blocks_per_row=self.sample_blocks_per_row)

    def _run_greedy(self, g: _StepGraph):
        """A decode step that picks its argmax and advances the static inputs to the next step."""
        b = g.batch
        logits = self._final_norm_lm_head(g, False, g.next_tokens)
        self.kernels.greedy_advance(g.next_tokens, g.step, g.tokens, b.input_ids, b.positions, b.context_lens,
                                    b.slot_mapping, b.block_tables, self.block_size)
        return logits

    GEMV_NAMES = ("qkv", "o", "gate_up", "down", "lm_head")      # what use_pdl and deep_gemv may name

    def _pdl(self, name: str) -> bool:
        """Whether the decode path launches this GEMV as a programmatic dependent (use_pdl: bool or names)."""
        return self._gemv_option("use_pdl", self.use_pdl, name)

    def _deep(self, name: str) -> bool:
        """Whether the decode path launches this GEMV with PA_CUDA_GEMV_DEEP (deep_gemv: names)."""
        return self._gemv_option("deep_gemv", self.deep_gemv, name)

    def _gemv_option(self, option: str, value: bool | tuple, name: str) -> bool:
        if isinstance(value, bool):
            return value
        unknown = set(value) - set(self.GEMV_NAMES)
        if unknown:
            raise ValueError(f"{option}: unknown GEMV names {sorted(unknown)}")
        return name in value

    def layer_stack(self) -> LayerStack:
        """pa_decode_layers_cuda's table of this backend's layers and caches (built once per weights x caches)."""
        if self._layer_stack is None:
            w = self.w
            layers = [{"input_norm": w[f"layers.{i}.input_norm"], "qkv": w[f"layers.{i}.qkv"], "o": w[f"layers.{i}.o"],
                       "post_norm": w[f"layers.{i}.post_norm"], "gate_up": w[f"layers.{i}.gate_up"],
                       "down": w[f"layers.{i}.down"], "key_cache": self.key_caches[i],
                       "value_cache": self.value_caches[i]} for i in range(self.config.num_layers)]
            self._layer_stack = self.kernels.layer_stack(layers, self.config.num_heads, self.gemv_max_rows)
        return self._layer_stack

    def _layer_gemv(self, i: int, r: torch.Tensor, batch: CudaBatch) -> torch.Tensor:
        """A decode layer of few rows on the fused GEMV kernels; r is the residual stream [M, hidden]."""
        c, kn, w, eps, pdl, deep = self.config, self.kernels, self.w, self.config.rms_norm_eps, self._pdl, self._deep
        if self.fuse_rope:
            qkv = kn.gemv_rope(r, w[f"layers.{i}.qkv"], w[f"layers.{i}.input_norm"], batch.positions,
                               batch.slot_mapping, self.key_caches[i], self.value_caches[i], c.num_heads, eps,
                               c.rope_theta, pdl=pdl("qkv"))
        else:
            qkv = kn.gemv(r, w[f"layers.{i}.qkv"], GEMV_NORM, w[f"layers.{i}.input_norm"], eps=eps, pdl=pdl("qkv"),
                          deep=deep("qkv"))
        T = qkv.shape[0]
        q = qkv[:, :c.q_size].view(T, c.num_heads, c.head_dim)
        if not self.fuse_rope:
            k = qkv[:, c.q_size:c.q_size + c.kv_size].view(T, c.num_kv_heads, c.head_dim)
            v = qkv[:, c.q_size + c.kv_size:].view(T, c.num_kv_heads, c.head_dim)
            kn.rope(q, k, batch.positions, c.rope_theta,
                    cache=(self.key_caches[i], self.value_caches[i], v, batch.slot_mapping))
        attn = self.paged_attention(i, q, batch)                               # [T, nh, hd]
        r = kn.gemv(attn.view(T, c.q_size), w[f"layers.{i}.o"], residual=r, pdl=pdl("o"), deep=deep("o"))
        if self.fuse_silu:
            act = kn.gemv(r, w[f"layers.{i}.gate_up"], GEMV_NORM_SILU, w[f"layers.{i}.post_norm"], eps=eps,
                          pdl=pdl("gate_up"))
            return kn.gemv(act, w[f"layers.{i}.down"], GEMV_PLAIN, residual=r, pdl=pdl("down"), deep=deep("down"))
        gate_up = kn.gemv(r, w[f"layers.{i}.gate_up"], GEMV_NORM, w[f"layers.{i}.post_norm"], eps=eps,
                          pdl=pdl("gate_up"))
        return kn.gemv(gate_up, w[f"layers.{i}.down"], GEMV_SILU, residual=r, pdl=pdl("down"), deep=deep("down"))
