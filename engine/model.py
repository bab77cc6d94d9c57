"""The Llama-family forward, written once against the Backend interface."""
from __future__ import annotations

import torch

from engine.backends.base import Backend
from engine.batch import Batch
from engine.config import ModelConfig


def fuse_weights(hf: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF-named float tensors -> the backend names of base.Backend (q/k/v and gate/up stacked)."""
    out: dict[str, torch.Tensor] = {"embed": hf["model.embed_tokens.weight"].float(),
                                    "norm": hf["model.norm.weight"].float()}
    head = hf.get("lm_head.weight")
    out["lm_head"] = out["embed"] if head is None or config.tie_word_embeddings else head.float()
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        out[f"layers.{i}.input_norm"] = hf[p + "input_layernorm.weight"].float()
        out[f"layers.{i}.post_norm"] = hf[p + "post_attention_layernorm.weight"].float()
        out[f"layers.{i}.qkv"] = torch.cat([hf[attn + n + "_proj.weight"].float() for n in "qkv"]).contiguous()
        out[f"layers.{i}.o"] = hf[attn + "o_proj.weight"].float()
        out[f"layers.{i}.gate_up"] = torch.cat(
            [hf[mlp + "gate_proj.weight"].float(), hf[mlp + "up_proj.weight"].float()]).contiguous()
        out[f"layers.{i}.down"] = hf[mlp + "down_proj.weight"].float()
    return out


class LlamaModel:
    """forward(batch) -> float32 logits [len(batch.logits_indices), vocab] on the backend's device."""

    def __init__(self, config: ModelConfig, backend: Backend):
        self.config = config
        self.backend = backend

    def layer(self, i: int, h: torch.Tensor, residual: torch.Tensor | None, batch: Batch
              ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, b = self.config, self.backend
        x, residual = b.rms_norm(h, f"layers.{i}.input_norm", residual)
        qkv = b.linear(x, f"layers.{i}.qkv")                   # [T, q_size + 2 * kv_size]
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.reshape(-1, cfg.num_heads, cfg.head_dim)         # [T, nh, hd]
        k = k.reshape(-1, cfg.num_kv_heads, cfg.head_dim)      # [T, nkv, hd]
        v = v.reshape(-1, cfg.num_kv_heads, cfg.head_dim).contiguous()
        q, k = b.rope(q, k, batch.positions)
        b.write_kv(i, k, v, batch)
        attn = b.paged_attention(i, q, batch)                  # [T, nh, hd]
        h = b.linear(attn.reshape(-1, cfg.q_size), f"layers.{i}.o")
        x, residual = b.rms_norm(h, f"layers.{i}.post_norm", residual)
        h = b.linear(b.silu_mul(b.linear(x, f"layers.{i}.gate_up")), f"layers.{i}.down")
        return h, residual

    @torch.inference_mode()
    def forward_tokens(self, batch: Batch) -> torch.Tensor | None:
        """The greedy tokens of a decode step whose every row wants logits, computed on the device in one
        backend call (Backend.forward_tokens), or None: then forward() and Backend.argmax."""
        return self.backend.forward_tokens(batch)

    def sample_step(self, batch: Batch, params: list, generators: list) -> torch.Tensor | None:
        """The tokens of a decode step whose every row wants logits -- greedy rows' argmax, sampled rows'
        draw from their own generators -- computed on the device in one backend call (Backend.sample_step),
        or None (no uniform drawn): then forward() and the Sampler."""
        return self.backend.sample_step(batch, params, generators)

    @torch.inference_mode()
    def forward(self, batch: Batch) -> torch.Tensor:
        b = self.backend
        batch = b.prepare(batch)
        logits = b.forward_step(batch)
        if logits is not None:
            return logits
        h = b.embed(batch.input_ids if batch.device_input_ids is None else batch.device_input_ids)
        whole = b.forward_layers(h, batch)
        if whole is not None:
            h, residual = whole
        else:
            residual = None
            for i in range(self.config.num_layers):
                fused = b.forward_layer(i, h, residual, batch)
                h, residual = fused if fused is not None else self.layer(i, h, residual, batch)
        if batch.logits_indices.numel() == 0:
            return torch.empty(0, self.config.vocab_size, device=h.device)
        rows = batch.logits_indices
        h, _ = b.rms_norm(h[rows], "norm", residual[rows])
        return b.logits(h)
