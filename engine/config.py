"""Typed configuration: ModelConfig (from weights metadata) and EngineConfig (runtime), validated."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
BACKENDS = ("auto", "torch", "cpu-int8", "cuda")


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a Llama-family decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "llama"

    def __post_init__(self) -> None:
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                    "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model config: {key} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model config: num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"model config: head_dim must be even, got {self.head_dim}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ValueError(f"model config: rope_theta must be positive, got {self.rope_theta!r}")
        if not (self.rms_norm_eps > 0):
            raise ValueError(f"model config: rms_norm_eps must be positive, got {self.rms_norm_eps!r}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def with_overrides(self, overrides: dict) -> "ModelConfig":
        """A copy with keys from config/model_config.yaml applied; unknown keys are an error."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"model config: unknown key(s) {unknown}; known: {sorted(known)}")
        if "eos_token_ids" in overrides:
            overrides = {**overrides, "eos_token_ids": tuple(overrides["eos_token_ids"])}
        return replace(self, **overrides)


@dataclass(frozen=True)
class EngineConfig:
    """Runtime settings of one Engine: cache geometry, batching limits, backend choice."""

    backend: str = "auto"
    block_size: int = 16
    num_blocks: int | None = None          # None: derive from kv_cache_mb
    kv_cache_mb: float | None = None       # None: the backend's (CPU 256 MB; CUDA most of the free GPU memory)
    max_num_seqs: int | None = None        # sequences a step; None: the backend's (CPU 32, CUDA 128)
    max_batched_tokens: int | None = None  # prompt tokens a step; None: the backend's default_max_batched_tokens
    max_model_len: int | None = None       # None: the model's context length
    enable_prefix_caching: bool = True
    num_threads: int | None = None         # torch / native threads; None: all cores
    seed: int = 0
    warmup: bool = True                    # prepare every step shape at start-up (cuda: capture the graphs)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"engine config: backend must be one of {BACKENDS}, got {self.backend!r}")
        for key in ("block_size", "max_num_seqs", "max_batched_tokens"):
            value = getattr(self, key)
            if key in ("max_batched_tokens", "max_num_seqs") and value is None:
                continue
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"engine config: {key} must be a positive integer, got {value!r}")
        if self.num_blocks is not None and (not isinstance(self.num_blocks, int) or self.num_blocks < 2):
            raise ValueError(f"engine config: num_blocks must be an integer >= 2, got {self.num_blocks!r}")
        if self.kv_cache_mb is not None and not (isinstance(self.kv_cache_mb, (int, float))
                                                 and not isinstance(self.kv_cache_mb, bool) and self.kv_cache_mb > 0):
            raise ValueError(f"engine config: kv_cache_mb must be positive, got {self.kv_cache_mb!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len <= 0):
            raise ValueError(f"engine config: max_model_len must be a positive integer, got {self.max_model_len!r}")
        if not isinstance(self.warmup, bool):
            raise ValueError(f"engine config: warmup must be true or false, got {self.warmup!r}")
        if self.num_threads is not None and (not isinstance(self.num_threads, int) or self.num_threads <= 0):
            raise ValueError(f"engine config: num_threads must be a positive integer, got {self.num_threads!r}")

    @classmethod
    def from_dict(cls, data: dict) -> "EngineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"engine config: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


def load_file(path: str | Path) -> dict:
    """Read a YAML or JSON config file into a dict, with the file named in any error."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"config file {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"config file {path}: not valid {path.suffix[1:].upper()}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_runtime_config(path: str | Path | None = None) -> dict:
    """config/runtime_config.yaml as a dict with sections 'engine', 'server', 'model'."""
    return load_file(path or CONFIG_DIR / "runtime_config.yaml")
