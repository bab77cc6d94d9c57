"""The small interface every backend implements; model.py composes the forward from it."""
from __future__ import annotations

import ctypes
import gc
from abc import ABC, abstractmethod

import torch

from engine.batch import Batch
from engine.config import ModelConfig
from engine.sampler import sample_rows


def settle_heap() -> None:
    """Collect cyclic garbage, then take every object alive now out of the cyclic collector's generations
    (gc.freeze). Call it once the model is loaded: modules, weights and tokenizer live as long as the
    process, and every full collection would otherwise rescan them while the engine runs -- the pipelined
    engine's host work at batch 32 went 0.40 -> 0.13 ms a step (benchmarks/engine_host.py). A later call
    unfreezes first, so what an earlier model left in cycles is collected then."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def release_free_heap() -> None:
    """glibc's malloc_trim(0): return freed heap pages to the OS (a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Backend(ABC):
    """Owns the prepared weights and the paged KV pools of one model on one device.

    Weight names (model.fuse_weights produces them, float32, HF orientation [out, in]):
      embed [vocab, hidden]; norm [hidden]; lm_head [vocab, hidden];
      layers.{i}.input_norm, layers.{i}.post_norm [hidden];
      layers.{i}.qkv [q_size + 2 * kv_size, hidden]; layers.{i}.o [hidden, q_size];
      layers.{i}.gate_up [2 * intermediate, hidden]; layers.{i}.down [hidden, intermediate].
    KV pools per layer: [num_blocks, num_kv_heads, block_size, head_dim] (see native/include/pa.h).
    """

    name = "base"
    # prepare() honours Batch.device_input_ids and the device runs asynchronously to the host, so the
    # engine may launch a decode step from the previous one's device-side argmax (Engine.step)
    supports_async = False
    # Prompt tokens a step (chunked prefill) when EngineConfig.max_batched_tokens is None: small chunks keep
    # the decode steps that share a step with a prompt chunk short on a CPU.
    default_max_batched_tokens = 512
    default_max_num_seqs = 32           # sequences a step when EngineConfig.max_num_seqs is None
    default_kv_cache_mb = 256.0

    def default_kv_cache_bytes(self, max_batched_tokens: int, max_num_seqs: int) -> int:
        """The KV cache's size when EngineConfig.kv_cache_mb is None."""
        return int(self.default_kv_cache_mb * 2**20)

    def __init__(self, config: ModelConfig):
        self.config = config
        self.num_blocks = 0
        self.block_size = 0

    # ---- set-up ------------------------------------------------------------------------------
    @abstractmethod
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Take the fused float32 weights (names above) and keep them in this backend's form."""

    @abstractmethod
    def kv_bytes_per_block(self, block_size: int) -> int:
        """Bytes one block takes across all layers (K and V, scales included)."""

    @abstractmethod
    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """Create the paged K/V pools for every layer."""

    @abstractmethod
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (copy-on-write, asked for by the block manager)."""

    def release_kv_cache(self) -> None:
        """Give the KV cache back now (its engine has stopped), before another one is sized. Nothing by
        default: the pools go with the backend."""

    def warmup(self, max_num_seqs: int, max_batched_tokens: int, max_model_len: int) -> int:
        """Get ready for steps of up to these sizes before the first request (the CUDA backend captures
        its graphs); returns how many step shapes were prepared. Nothing to do by default."""
        return 0

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy tokens of logits [n, vocab] (first maximum, as torch.argmax), on the logits' device; the
        pipelined engine takes the next step's inputs from it without a host round trip."""
        return logits.argmax(-1)

    def sample(self, logits: torch.Tensor, params: list, generators: list) -> torch.Tensor:
        """The sampled rows' tokens (engine.sampler.sample_rows' contract: int64 [n] on the logits' device,
        one uniform from each row's generator, nothing waited for); sample_rows itself by default."""
        return sample_rows(logits, params, generators)

    def prepare(self, batch: Batch) -> Batch:
        """Move/convert the batch's index tensors to what this backend's ops read."""
        return batch

    # ---- ops ---------------------------------------------------------------------------------
    @abstractmethod
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[num_tokens] -> [num_tokens, hidden]."""

    @abstractmethod
    def rms_norm(self, x: torch.Tensor, name: str, residual: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (+ residual) -> (rms_norm(sum) * weight[name], sum). The sum is the new residual."""

    @abstractmethod
    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """[num_tokens, in] @ weight[name].T -> [num_tokens, out]."""

    @abstractmethod
    def rope(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary embedding (HF rotate_half convention) on q [T, nh, hd] and k [T, nkv, hd]."""

    @abstractmethod
    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: Batch) -> None:
        """Store k, v [T, nkv, hd] into layer's pools at batch.slot_mapping."""

    @abstractmethod
    def paged_attention(self, layer: int, q: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Causal attention of q [T, nh, hd] over the layer's cached K/V -> [T, nh, hd]."""

    @abstractmethod
    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2I] -> silu(gate) * up, [T, I]."""

    def forward_layer(self, layer: int, h: torch.Tensor, residual: torch.Tensor | None,
                      batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A backend may fuse a whole layer; None means use model.py's composition."""
        return None

    def forward_layers(self, h: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A backend may run every layer in one call on the embedded h; (h, residual) or None."""
        return None

    def forward_step(self, batch: Batch) -> torch.Tensor | None:
        """A backend may run the whole step itself (e.g. a CUDA graph); None means model.py composes it."""
        return None

    def forward_tokens(self, batch: Batch) -> torch.Tensor | None:
        """A backend may run a greedy decode step whole (argmax included) -> device tokens [num_seqs], valid
        until its next step; None means forward() then argmax()."""
        return None

    def sample_step(self, batch: Batch, params: list, generators: list) -> torch.Tensor | None:
        """A backend may run a decode step of unpenalised rows without logprobs whole, its sampling included
        -> device tokens [num_seqs] (greedy rows' argmax, the others drawn as Sampler.tokens draws them: one
        uniform from each sampled row's generator, in row order), valid until its next step; None (having
        drawn nothing) means forward() then the Sampler."""
        return None

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden rows [n, hidden] (already normed) -> float32 logits [n, vocab] on this backend's
        device; the sampler decides greedy rows there and moves only what it needs to the host."""
        return self.linear(h, "lm_head").float()
