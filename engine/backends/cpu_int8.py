"""INT8 CPU backend: int8 weights and int8 paged KV pools, run by libpa_cpu.so's AVX2 kernels.

Every linear runs our blocked-Q8 GEMM/GEMV (activations quantized per 32 values). oneDNN's s8 matmul
(pa_linear_onednn_cpu) measures 1.6-4.1x slower at M = 1, 8 and 32 here and scales activations per row,
which drops teacher-forced top-1 agreement with fp32 to 0.89-0.92 on this model (benchmarks/results_cpu.md),
so the per-(M, shape) choice is ours everywhere; one native call (pa_llama_layers_cpu) runs every layer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from engine import native
from engine.backends.base import Backend, release_free_heap
from engine.batch import Batch
from engine.config import ModelConfig
from engine.native import NativeError, NativeLib
from engine.sampler import row_knobs
from engine.weights import quantize_int8

GROUP = 32                                     # int8 group along K (weights and activations)
LINEARS = ("qkv", "o", "gate_up", "down")      # per-layer int8 matrices


def fuse_int8(int8: dict[str, tuple[torch.Tensor, torch.Tensor]], config: ModelConfig
              ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """HF-named int8 weights -> backend names (rows of q/k/v and gate/up stacked, with their scales)."""
    if "model.embed_tokens.weight" not in int8 and "lm_head.weight" not in int8 \
            and not any(n.startswith("model.layers.") for n in int8):
        return dict(int8)
    cat = lambda names: tuple(torch.cat([int8[n][j] for n in names]).contiguous() for j in (0, 1))  # noqa: E731
    out = {}
    if "model.embed_tokens.weight" in int8:
        out["embed"] = int8["model.embed_tokens.weight"]
    head = int8.get("lm_head.weight")
    if head is not None and not config.tie_word_embeddings:
        out["lm_head"] = head
    elif "embed" in out:
        out["lm_head"] = out["embed"]
    for i in range(config.num_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        out[f"layers.{i}.qkv"] = cat([a + f"{x}_proj.weight" for x in "qkv"])
        out[f"layers.{i}.o"] = int8[a + "o_proj.weight"]
        out[f"layers.{i}.gate_up"] = cat([m + "gate_proj.weight", m + "up_proj.weight"])
        out[f"layers.{i}.down"] = int8[m + "down_proj.weight"]
    return out


def load_cpu_lib() -> NativeLib:
    """libpa_cpu.so, or NativeError when this CPU lacks AVX2/FMA (the engine then uses torch)."""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        missing = [x for x in ("avx2", "fma") if x not in flags]
        if missing:
            raise NativeError(f"cpu-int8 needs AVX2 and FMA; this CPU lacks {missing}: use the torch backend")
    lib = native.load("cpu")
    if not lib.lib.pa_supported_cpu():
        raise NativeError("cpu-int8: libpa_cpu reports this CPU unsupported (needs AVX2 + FMA)")
    return lib


@dataclass
class CpuBatch(Batch):
    """A Batch plus the RoPE table of its positions (built once per forward, read by every layer)."""

    rope_cos: torch.Tensor | None = None        # [T, head_dim / 2] float32
    rope_sin: torch.Tensor | None = None
    layer_args: tuple | None = None             # cffi pointers every layer call of this step reuses


class CpuInt8Backend(Backend):
    """int8 weights ([N, K] + scales [N, K/32]) and int8 KV pools (+ a scale per block and KV head)."""

    name = "cpu-int8"

    def __init__(self, config: ModelConfig, lib: NativeLib | None = None, smooth_keys: float = 1.0,
                 num_threads: int | None = None, use_pool: bool = True):
        super().__init__(config)
        self.smooth_keys = smooth_keys
        self.nl = lib or load_cpu_lib()
        self.lib, self.ffi = self.nl.lib, self.nl.ffi
        self._pool = self.ffi.NULL                                    # NULL: layers run in OpenMP regions
        if use_pool:
            handle = self.ffi.new("pa_pool_cpu **")
            self._check(self.lib.pa_pool_create_cpu(handle, num_threads or self.lib.pa_num_threads_cpu()),
                        "pa_pool_create_cpu")
            self._pool = self.ffi.gc(handle[0], self.lib.pa_pool_destroy_cpu)
        self.q: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}   # name -> (int8 [N, K], scales [N, K/32])
        self.f: dict[str, torch.Tensor] = {}                          # norms, float32
        self.key_caches: list[torch.Tensor] = []                      # [num_blocks, nkv, bs, hd] int8
        self.value_caches: list[torch.Tensor] = []
        self.k_scales: list[torch.Tensor] = []                        # [num_blocks, nkv] float32
        self.v_scales: list[torch.Tensor] = []
        self._scratch = torch.empty(0, dtype=torch.uint8)
        self._scratch_cdata = self.ffi.NULL
        self._heap_released = False
        self._layers_w = None                                         # pa_layer_weights_cpu[num_layers]
        self._kv_arrays: list = []                                    # k, k scales, v, v scales: a pointer a layer
        self._dims = None

    # ---- set-up ------------------------------------------------------------------------------
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        tied = weights["lm_head"] is weights["embed"]
        int8 = {}
        for name, t in weights.items():
            if name.split(".")[-1] in LINEARS or name in ("lm_head", "embed"):
                if name == "embed" and tied:
                    continue
                int8[name] = quantize_int8(t.float())
        rest = {n: t for n, t in weights.items() if n not in int8 and n != "embed"}
        self.load_quantized_weights(int8, rest)

    def load_quantized_weights(self, int8: dict[str, tuple[torch.Tensor, torch.Tensor]],
                               float_rest: dict[str, torch.Tensor]) -> None:
        """int8: name -> (q [N, K] int8, scales [N, K/32] float32), in backend names (layers.0.qkv) or
        HF names (weights/ layout: q/k/v and gate/up are stacked here); float_rest: at least the norms,
        backend names. "embed" may be absent: the embedding then reads lm_head's rows (tied weights)."""
        c = self.config
        int8 = fuse_int8(int8, c)
        if "lm_head" not in int8:                         # float lm_head only: quantize it here
            int8["lm_head"] = quantize_int8(float_rest["lm_head"].float())
        self.q = {}
        for name, (q, s) in int8.items():
            if name not in ("embed", "lm_head") and name.split(".")[-1] not in LINEARS:
                continue
            if q.dtype != torch.int8 or q.dim() != 2 or q.shape[1] % GROUP:
                raise ValueError(f"{name}: want int8 [N, K] with K % {GROUP} == 0, got {q.dtype} {tuple(q.shape)}")
            if s.shape != (q.shape[0], q.shape[1] // GROUP):
                raise ValueError(f"{name}: scales {tuple(s.shape)} do not match {tuple(q.shape)}")
            self.q[name] = (q.contiguous(), s.float().contiguous())
        self.q.setdefault("embed", self.q["lm_head"])
        self._pack_weights()
        if self.smooth_keys:
            for i in range(c.num_layers):
                self._smooth_keys(i, float_rest[f"layers.{i}.input_norm"].float())
        self.f = {n: t.float().contiguous() for n, t in float_rest.items()
                  if n == "norm" or n.endswith("_norm")}                # only the norms stay float
        for i in range(c.num_layers):
            for name in LINEARS:
                if f"layers.{i}.{name}" not in self.q:
                    raise ValueError(f"missing int8 weight layers.{i}.{name}")
        self._layers_w = self.ffi.new("pa_layer_weights_cpu[]", c.num_layers)   # for pa_llama_layers_cpu
        for i in range(c.num_layers):
            self._fill_layer(self.ffi.addressof(self._layers_w, i), i)
        release_free_heap()                         # freed float32 temporaries back to the OS now

    def _pack_weights(self) -> None:
        """Move every int8 matrix and its scales into one allocation and give freed memory back.

        Loading goes GGUF -> float32 -> int8; glibc serves the int8 tensors from a heap that the float
        temporaries fragmented, so RSS stayed ~500 MiB above the weights. One large block is mmap'd.
        """
        unique = {id(q): (q, s) for q, s in self.q.values()}
        sizes = [(q.numel() + 63) // 64 * 64 + (s.numel() * 4 + 63) // 64 * 64 for q, s in unique.values()]
        arena = torch.empty(sum(sizes), dtype=torch.uint8)
        moved, off = {}, 0
        for key, (q, s) in unique.items():
            qn, sn = (q.numel() + 63) // 64 * 64, (s.numel() * 4 + 63) // 64 * 64
            nq = arena[off:off + q.numel()].view(torch.int8).view(q.shape).copy_(q)
            ns = arena[off + qn:off + qn + s.numel() * 4].view(torch.float32).view(s.shape).copy_(s)
            moved[key] = (nq, ns)
            off += qn + sn
        self.q = {name: moved[id(q)] for name, (q, _) in self.q.items()}
        self._arena = arena
        self._heap_released = False

    def _smooth_keys(self, i: int, input_norm: torch.Tensor) -> None:
        """Flatten K's channel magnitudes before the per-tile int8 KV cache sees them.

        q . k is unchanged when key channel d is divided by c_d and the query channels that meet it are
        multiplied by c_d; c_d is the norm of W_k's row d (input norm folded in), shared by the RoPE pair
        (d, d + head_dim / 2) so the rotation commutes.  Only the rows' scales change (q stays int8).
        """
        c = self.config
        q, s = self.q[f"layers.{i}.qkv"]
        rows = q[c.q_size:c.q_size + c.kv_size].float().reshape(c.kv_size, -1, GROUP) * s[c.q_size:c.q_size + c.kv_size, :, None]
        norm = (rows.reshape(c.kv_size, -1) * input_norm[None, :]).norm(dim=1)       # [kv_size]
        pair = norm.reshape(c.num_kv_heads, 2, c.head_dim // 2).pow(2).mean(1, keepdim=True).sqrt()
        f = pair.expand(c.num_kv_heads, 2, c.head_dim // 2).reshape(c.num_kv_heads, c.head_dim)
        f = (f / f.mean()).clamp_min(1e-3) ** self.smooth_keys                          # [nkv, hd]
        s = s.clone()
        s[c.q_size:c.q_size + c.kv_size] /= f.reshape(-1, 1)
        s[:c.q_size] *= f.repeat_interleave(c.num_heads // c.num_kv_heads, 0).reshape(-1, 1)
        self.q[f"layers.{i}.qkv"] = (q, s.contiguous())

    def _fill_layer(self, w, i: int) -> None:
        w.input_norm = self._p(self.f[f"layers.{i}.input_norm"], "float *")
        w.post_norm = self._p(self.f[f"layers.{i}.post_norm"], "float *")
        for name in LINEARS:
            q, s = self.q[f"layers.{i}.{name}"]
            setattr(w, name, self._p(q, "int8_t *"))
            setattr(w, name + "_scales", self._p(s, "float *"))

    def pool_stats(self) -> tuple[int, int]:
        """(stalls, solo calls) of the worker pool: how often shared cores made the layers run alone."""
        if self._pool == self.ffi.NULL:
            return 0, 0
        stalls, solo = self.ffi.new("int64_t *"), self.ffi.new("int64_t *")
        self._check(self.lib.pa_pool_stats_cpu(stalls, solo, self._pool), "pa_pool_stats_cpu")
        return int(stalls[0]), int(solo[0])

    def weight_bytes(self) -> int:
        """Bytes of the int8 weights, their scales and the float norms."""
        seen = {id(q): q.numel() + s.numel() * 4 for q, s in self.q.values()}
        return sum(seen.values()) + sum(t.numel() * 4 for t in self.f.values())

    def kv_bytes_per_block(self, block_size: int) -> int:
        c = self.config
        return 2 * c.num_layers * c.num_kv_heads * (block_size * c.head_dim + 4)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        c = self.config
        if not 0 < block_size <= 64:
            raise ValueError(f"cpu-int8: block_size must be in [1, 64], got {block_size}")
        shape = (num_blocks, c.num_kv_heads, block_size, c.head_dim)
        self.key_caches = [torch.zeros(shape, dtype=torch.int8) for _ in range(c.num_layers)]
        self.value_caches = [torch.zeros(shape, dtype=torch.int8) for _ in range(c.num_layers)]
        self.k_scales = [torch.zeros(num_blocks, c.num_kv_heads) for _ in range(c.num_layers)]
        self.v_scales = [torch.zeros(num_blocks, c.num_kv_heads) for _ in range(c.num_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size
        d = self.ffi.new("pa_layer_dims_cpu *")
        d.hidden, d.intermediate = c.hidden_size, c.intermediate_size
        d.num_heads, d.num_kv_heads, d.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        d.block_size, d.num_blocks = block_size, num_blocks
        d.eps, d.attn_scale = c.rms_norm_eps, c.head_dim ** -0.5
        self._dims = d
        release_free_heap()                         # the loader's float copies are normally gone by now
        self._kv_arrays = [self.ffi.new(f"{ctype}[]", [self._p(t, ctype) for t in pools])
                           for ctype, pools in (("int8_t *", self.key_caches), ("float *", self.k_scales),
                                                ("int8_t *", self.value_caches), ("float *", self.v_scales))]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs])
        dst = torch.tensor([d for _, d in pairs])
        for t in self.key_caches + self.value_caches + self.k_scales + self.v_scales:
            t[dst] = t[src]

    def prepare(self, batch: Batch) -> CpuBatch:
        if not self._heap_released:                  # the loader's float copies are gone by now
            release_free_heap()
            self._heap_released = True
        for name in ("slot_mapping", "query_start_loc", "context_lens", "block_tables"):
            t = getattr(batch, name)
            if t.dtype != torch.int32 or not t.is_contiguous():
                raise NativeError(f"batch.{name} must be contiguous int32, got {t.dtype}")
        positions = batch.positions.to(torch.int64).contiguous()
        cos, sin = self._rope_table(positions)
        fields = {**vars(batch), "positions": positions}
        out = CpuBatch(**fields, rope_cos=cos, rope_sin=sin)
        # pointers of this step's batch arrays, cast once instead of once per layer
        out.layer_args = (self._p(cos, "float *"), self._p(sin, "float *"), self._p(out.slot_mapping, "int32_t *"),
                          self._p(out.block_tables, "int32_t *"), self._p(out.context_lens, "int32_t *"),
                          self._p(out.query_start_loc, "int32_t *"))
        return out

    def sample(self, logits: torch.Tensor, params: list, generators: list) -> torch.Tensor:
        """Every sampled row in one native call (sample_rows): the same tokens as engine.sampler.sample_rows on
        the same logits and generator states but for a draw within rounding of a CDF step."""
        if logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.dim() != 2:
            return super().sample(logits, params, generators)
        return self.sample_rows(logits, row_knobs(params, generators, logits.shape[1]))

    def sample_rows(self, logits: torch.Tensor, knobs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """One sampled token a row of logits [n, vocab] (float32) -> int64 [n] (pa_sample_rows_cpu: the CUDA
        kernel's algorithm, a core a row on the backend's pool -- a histogram of the row and one small bucket
        sorted, where sample_rows sorts the vocabulary): knobs [n, 5] float64, engine.sampler.row_knobs'
        columns."""
        op = "pa_sample_rows_cpu"
        logits = logits.contiguous()
        n, vocab = logits.shape
        if knobs.dtype != torch.float64 or tuple(knobs.shape) != (n, 5) or knobs.device.type != "cpu":
            raise NativeError(f"{op}: knobs must be float64 [{n}, 5] on the CPU, got {knobs.dtype} "
                              f"{tuple(knobs.shape)} on {knobs.device}")
        if out is None:
            out = torch.empty(n, dtype=torch.int64)
        self._check(self.lib.pa_sample_rows_cpu(self._pool, self._p(out, "int64_t *"), self._p(logits, "float *"),
                                                vocab, self._p(knobs.contiguous(), "double *"), n, vocab), op)
        return out

    # ---- helpers -----------------------------------------------------------------------------
    def _p(self, t: torch.Tensor, ctype: str):
        return self.nl.ptr(t, ctype)

    def _check(self, status: int, op: str) -> None:
        self.nl.check(status, op)

    def _scratch_ptr(self, nbytes: int):
        if self._scratch.numel() < nbytes:
            self._scratch = torch.empty(max(nbytes, 2 * self._scratch.numel()), dtype=torch.uint8)
            self._scratch_cdata = self._p(self._scratch, "void *")
        return self._scratch_cdata, self._scratch.numel()

    def _rope_table(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        t = positions.shape[0]
        cos = torch.empty(t, c.head_dim // 2)
        sin = torch.empty(t, c.head_dim // 2)
        self._check(self.lib.pa_rope_table_cpu(self._p(cos, "float *"), self._p(sin, "float *"),
                                               self._p(positions, "int64_t *"), t, c.head_dim, c.rope_theta),
                    "pa_rope_table_cpu")
        return cos, sin

    @staticmethod
    def _f32(t: torch.Tensor, shape: tuple, what: str) -> torch.Tensor:
        if t.dtype != torch.float32 or tuple(t.shape) != shape:
            raise NativeError(f"{what}: want float32 {shape}, got {t.dtype} {tuple(t.shape)}")
        return t.contiguous()

    @staticmethod
    def _rows(t: torch.Tensor, heads: int, head_dim: int, what: str) -> int:
        """Row stride (floats) of a [T, heads, head_dim] float32 view whose rows are dense."""
        if t.dtype != torch.float32 or t.dim() != 3 or tuple(t.shape[1:]) != (heads, head_dim):
            raise NativeError(f"{what}: want float32 [T, {heads}, {head_dim}], got {t.dtype} {tuple(t.shape)}")
        if t.stride(2) != 1 or t.stride(1) != head_dim or t.stride(0) < heads * head_dim:
            raise NativeError(f"{what}: rows must be dense [heads, head_dim], strides {t.stride()}")
        return t.stride(0)

    # ---- ops ---------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        q, s = self.q["embed"]
        ids = input_ids.to(torch.int64).contiguous()
        out = torch.empty(ids.shape[0], q.shape[1])
        self._check(self.lib.pa_embed_q8_cpu(self._p(out, "float *"), self._p(ids, "int64_t *"), self._p(q, "int8_t *"),
                                             self._p(s, "float *"), ids.shape[0], q.shape[0], q.shape[1]),
                    "pa_embed_q8_cpu")
        return out

    def rms_norm(self, x, name, residual=None):
        weight = self.f[name]
        shape = (x.shape[0], weight.shape[0])
        x = self._f32(x, shape, "rms_norm x")
        out = torch.empty(shape)
        res_ptr = self.ffi.NULL
        if residual is not None:
            if not residual.is_contiguous():
                raise NativeError("rms_norm: residual must be contiguous (updated in place)")
            residual = self._f32(residual, shape, "rms_norm residual")
            res_ptr = self._p(residual, "float *")
        self._check(self.lib.pa_rms_norm_cpu(self._p(out, "float *"), res_ptr, self._p(x, "float *"),
                                             self._p(weight, "float *"), shape[0], shape[1], self.config.rms_norm_eps),
                    "pa_rms_norm_cpu")
        return out, (x if residual is None else residual)

    def linear(self, x, name):
        q, s = self.q[name]
        n, k = q.shape
        x = self._f32(x, (x.shape[0], k), f"linear {name} x")
        m = x.shape[0]
        y = torch.empty(m, n)
        scratch, nbytes = self._scratch_ptr(((m * k + 63) & ~63) + m * (k // GROUP) * 4)
        self._check(self.lib.pa_linear_q8_cpu(self._pool, self._p(y, "float *"), scratch, nbytes, self._p(x, "float *"),
                                              self._p(q, "int8_t *"), self._p(s, "float *"), m, n, k),
                    f"pa_linear_q8_cpu({name})")
        return y

    def rope(self, q, k, positions):
        c = self.config
        positions = positions.to(torch.int64).contiguous()
        cos, sin = self._rope_table(positions)
        q = torch.empty_like(q, memory_format=torch.contiguous_format).copy_(q)
        k = torch.empty_like(k, memory_format=torch.contiguous_format).copy_(k)
        qs = self._rows(q, c.num_heads, c.head_dim, "rope q")
        ks = self._rows(k, c.num_kv_heads, c.head_dim, "rope k")
        if positions.shape[0] != q.shape[0] or k.shape[0] != q.shape[0]:
            raise NativeError("rope: q, k and positions disagree on the number of tokens")
        self._check(self.lib.pa_rope_cpu(self._p(q, "float *"), self._p(k, "float *"), self._p(cos, "float *"),
                                         self._p(sin, "float *"), q.shape[0], c.num_heads, c.num_kv_heads,
                                         c.head_dim, qs, ks), "pa_rope_cpu")
        return q, k

    def write_kv(self, layer, k, v, batch):
        c = self.config
        ks = self._rows(k, c.num_kv_heads, c.head_dim, "write_kv k")
        vs = self._rows(v, c.num_kv_heads, c.head_dim, "write_kv v")
        slots = batch.slot_mapping
        if slots.dtype != torch.int32 or not slots.is_contiguous() or not slots.shape[0] == k.shape[0] == v.shape[0]:
            raise NativeError("write_kv: slot_mapping must be contiguous int32 [T] matching k and v")
        self._check(self.lib.pa_write_kv_q8_cpu(
            self._p(self.key_caches[layer], "int8_t *"), self._p(self.k_scales[layer], "float *"),
            self._p(self.value_caches[layer], "int8_t *"), self._p(self.v_scales[layer], "float *"),
            self.ffi.cast("float *", k.data_ptr()), self.ffi.cast("float *", v.data_ptr()),
            self._p(slots, "int32_t *"), k.shape[0], c.num_kv_heads, c.head_dim, self.block_size, self.num_blocks,
            ks, vs), "pa_write_kv_q8_cpu")

    def paged_attention(self, layer, q, batch):
        c = self.config
        qs = self._rows(q, c.num_heads, c.head_dim, "paged_attention q")
        out = torch.empty(q.shape[0], c.num_heads, c.head_dim)
        tables = batch.block_tables
        self._check(self.lib.pa_paged_attention_q8_cpu(
            self._p(out, "float *"), self.ffi.cast("float *", q.data_ptr()),
            self._p(self.key_caches[layer], "int8_t *"), self._p(self.k_scales[layer], "float *"),
            self._p(self.value_caches[layer], "int8_t *"), self._p(self.v_scales[layer], "float *"),
            self._p(tables, "int32_t *"), self._p(batch.context_lens, "int32_t *"),
            self._p(batch.query_start_loc, "int32_t *"), batch.num_seqs, q.shape[0], c.num_heads, c.num_kv_heads,
            c.head_dim, self.block_size, tables.shape[1], self.num_blocks, qs, c.head_dim ** -0.5),
            "pa_paged_attention_q8_cpu")
        return out

    def silu_mul(self, gate_up):
        t, two_i = gate_up.shape
        gate_up = self._f32(gate_up, (t, two_i), "silu_mul gate_up")
        out = torch.empty(t, two_i // 2)
        self._check(self.lib.pa_silu_mul_cpu(self._p(out, "float *"), self._p(gate_up, "float *"), t, two_i // 2),
                    "pa_silu_mul_cpu")
        return out

    def forward_layers(self, h, batch):
        """Every layer in one native call (pa_llama_layers_cpu): the batch is checked once, and the ~30
        Python -> C calls of a step (~4% of a batch-1 step) are gone."""
        if not isinstance(batch, CpuBatch) or batch.rope_cos is None or self._layers_w is None:
            return None
        shape = (batch.num_tokens, self.config.hidden_size)
        if h.dtype != torch.float32 or tuple(h.shape) != shape or not h.is_contiguous():
            raise NativeError(f"forward_layers: h must be contiguous float32 {shape}")
        residual = torch.empty(shape)
        scratch, nbytes = self._scratch_ptr(self.lib.pa_llama_layer_scratch_bytes_cpu(self._dims, shape[0]))
        cos_p, sin_p, slots_p, tables_p, lens_p, qsl_p = self._layer_args(batch)
        self._check(self.lib.pa_llama_layers_cpu(
            self._pool, self._p(h, "float *"), self._p(residual, "float *"), scratch, nbytes,
            self.config.num_layers, *self._kv_arrays, self._layers_w, self._dims, cos_p, sin_p, slots_p, tables_p,
            lens_p, qsl_p, shape[0], batch.num_seqs, batch.block_tables.shape[1]), "pa_llama_layers_cpu")
        return h, residual

    def _layer_args(self, batch: CpuBatch) -> tuple:
        if batch.layer_args is None:              # a CpuBatch built outside prepare()
            batch.layer_args = (
                self._p(batch.rope_cos, "float *"), self._p(batch.rope_sin, "float *"),
                self._p(batch.slot_mapping, "int32_t *"), self._p(batch.block_tables, "int32_t *"),
                self._p(batch.context_lens, "int32_t *"), self._p(batch.query_start_loc, "int32_t *"))
        return batch.layer_args
