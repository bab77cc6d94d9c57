"""The float32 PyTorch reference backend: plain ops, the truth native backends are tested against."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.backends.base import Backend
from engine.batch import Batch
from engine.config import ModelConfig


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim] for HF's rotate_half convention, computed in float64 then cast."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device)
                                / head_dim))
    freqs = positions.to(torch.float64)[:, None] * inv_freq[None, :]   # [T, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, hd] rotated by rotate_half."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def paged_decode_attention_ref(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per sequence (decode), all sequences at once: gather to the longest context, mask the rest."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, block_size = key_cache.shape[1], key_cache.shape[2]
    max_ctx = int(context_lens.max())
    pos = torch.arange(max_ctx, device=q.device)
    blocks = block_tables[:, pos // block_size].long().clamp(min=0)              # [S, L]
    offsets = (pos % block_size).expand(num_seqs, max_ctx)
    k = key_cache[blocks, :, offsets].to(q.dtype)                                 # [S, L, nkv, hd]
    v = value_cache[blocks, :, offsets].to(q.dtype)
    qg = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)     # [S, nkv, g, hd]
    scores = torch.einsum("skgd,slkd->skgl", qg, k) * scale                      # [S, nkv, g, L]
    masked = pos[None, :] >= context_lens[:, None].long()                          # [S, L]
    scores = scores.masked_fill(masked[:, None, None, :], float("-inf"))
    out = torch.einsum("skgl,slkd->skgd", scores.softmax(-1), v)
    return out.reshape(num_seqs, num_heads, head_dim)


def gather_pages(cache: torch.Tensor, pages: torch.Tensor, ctx: int) -> torch.Tensor:
    """The first ctx slots of one sequence's pages (int64 block ids) of a paged cache [num_blocks, nkv,
    block_size, hd], contiguous per kv head: [nkv, ctx, hd] (a view of the gathered copy)."""
    return cache.index_select(0, pages).transpose(0, 1).reshape(cache.shape[1], -1, cache.shape[3])[:, :ctx]


def paged_attention_ref(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                        block_tables: torch.Tensor, context_lens: torch.Tensor,
                        query_start_loc: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention over paged K/V ([num_blocks, nkv, block_size, hd]) -> [T, nh, hd]."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, block_size = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for s, ctx in enumerate(context_lens.tolist()):
        q_s = q[starts[s]:starts[s + 1]]                                   # [qlen, nh, hd]
        qlen = q_s.shape[0]
        if qlen == 0:
            continue
        nblk = (ctx + block_size - 1) // block_size
        table = block_tables[s, :nblk].long()
        k, v = gather_pages(key_cache, table, ctx), gather_pages(value_cache, table, ctx)
        k = k.repeat_interleave(group, dim=0).to(q.dtype)                 # [nh, ctx, hd]
        v = v.repeat_interleave(group, dim=0).to(q.dtype)
        scores = torch.einsum("qhd,hkd->hqk", q_s, k) * scale             # [nh, qlen, ctx]
        q_pos = torch.arange(ctx - qlen, ctx, device=q.device)[:, None]
        mask = torch.arange(ctx, device=q.device)[None, :] > q_pos                         # [qlen, ctx]
        scores = scores.masked_fill(mask[None], float("-inf"))
        out[starts[s]:starts[s + 1]] = torch.einsum("hqk,hkd->qhd", scores.softmax(-1), v)
    return out


class TorchRefBackend(Backend):
    """float32 on the CPU (or any torch device): the reference."""

    name = "torch"

    def __init__(self, config: ModelConfig, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        super().__init__(config)
        self.device = torch.device(device)
        self.dtype = dtype
        self.w: dict[str, torch.Tensor] = {}
        self.key_caches: list[torch.Tensor] = []
        self.value_caches: list[torch.Tensor] = []

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.w = {name: t.to(self.device, self.dtype).contiguous() for name, t in weights.items()}
        if weights["lm_head"] is weights["embed"]:
            self.w["lm_head"] = self.w["embed"]

    def kv_bytes_per_block(self, block_size: int) -> int:
        c = self.config
        return 2 * c.num_layers * c.num_kv_heads * block_size * c.head_dim * self.dtype.itemsize

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        c = self.config
        shape = (num_blocks, c.num_kv_heads, block_size, c.head_dim)
        self.key_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.num_layers)]
        self.value_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.num_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        for cache in self.key_caches + self.value_caches:
            cache[dst] = cache[src]

    def prepare(self, batch: Batch) -> Batch:
        if self.device.type == "cpu":
            return batch
        fields = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in vars(batch).items()}
        return Batch(**fields)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.w["embed"][input_ids]

    def rms_norm(self, x, name, residual=None):
        if residual is not None:
            x = x + residual
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        return (out.to(x.dtype) * self.w[name]), x

    def linear(self, x, name):
        return x @ self.w[name].T

    def rope(self, q, k, positions):
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, q.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def write_kv(self, layer, k, v, batch):
        slots = batch.slot_mapping.long()
        keep = slots >= 0
        slots, k, v = slots[keep], k[keep], v[keep]
        blocks, offsets = slots // self.block_size, slots % self.block_size
        self.key_caches[layer][blocks, :, offsets] = k.to(self.dtype)
        self.value_caches[layer][blocks, :, offsets] = v.to(self.dtype)

    def paged_attention(self, layer, q, batch):
        if batch.is_decode_only:
            return paged_decode_attention_ref(q, self.key_caches[layer], self.value_caches[layer],
                                              batch.block_tables, batch.context_lens, self.config.head_dim ** -0.5)
        return paged_attention_ref(q, self.key_caches[layer], self.value_caches[layer], batch.block_tables,
                                   batch.context_lens, batch.query_start_loc, self.config.head_dim ** -0.5)

    def silu_mul(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
