"""The reference backend against HuggingFace transformers on the same GGUF weights (real SmolLM2)."""
from __future__ import annotations

import pytest
import torch

from engine.backends.torch_ref import TorchRefBackend
from engine.batch import Batch
from engine.model import LlamaModel
from engine.sequence import SamplingParams
from tests.conftest import make_real_engine, run_to_completion
from tests.test_cpu_int8_model import fixed_text

pytestmark = pytest.mark.slow

NEW_TOKENS = 64


def long_text(num_chars: int) -> str:
    """Fixed prose shipped by installed packages (never downloaded): the accuracy test's licence texts."""
    text = fixed_text()
    assert len(text) >= num_chars, "not enough licence text found in site-packages"
    return text[:num_chars]


def prompt_set(tokenizer) -> list[list[int]]:
    chats = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You are a terse assistant."},
         {"role": "user", "content": "List three prime numbers."}],
        [{"role": "user", "content": "Write a haiku about paged memory."}],
        [{"role": "user", "content": "Summarize this licence in one sentence:\n" + long_text(1500)}],
    ]
    raw = ["The quick brown fox", "def fibonacci(n):\n    ", "Once upon a time, in a small village,",
           long_text(1800)]
    ids = [tokenizer.apply_chat_template(m) for m in chats] + [tokenizer.encode(t) for t in raw]
    assert sum(len(p) > 300 for p in ids) >= 2
    return ids


def test_greedy_tokens_match_hf(real_loaded, real_fused, real_tokenizer, hf_model):
    prompts = prompt_set(real_tokenizer)
    eos = hf_model.generation_config.eos_token_id
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, stop_token_ids=eos)
    eng = make_real_engine(real_loaded, real_fused, real_tokenizer)
    ours = run_to_completion(eng, [eng.submit(p, params) for p in prompts])
    for prompt, mine in zip(prompts, ours):
        with torch.inference_mode():
            out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        theirs = out[0, len(prompt):].tolist()
        assert mine.token_ids == theirs, f"prompt of {len(prompt)} tokens diverged"
    eng.blocks.check_invariants()
    assert eng.blocks.num_used_blocks == 0


def last_logits(loaded, fused, prompt: list[int], block_size: int = 16) -> torch.Tensor:
    backend = TorchRefBackend(loaded.config)
    backend.load_weights(fused)
    nblk = -(-len(prompt) // block_size)
    backend.allocate_kv_cache(nblk, block_size)
    batch = Batch.build([(prompt, 0, list(range(nblk)))], block_size, [True])
    return LlamaModel(loaded.config, backend).forward(batch)[0]


def test_last_position_logits_match_hf(real_loaded, real_fused, real_tokenizer, hf_model):
    for prompt in prompt_set(real_tokenizer)[::2]:
        ours = last_logits(real_loaded, real_fused, prompt)
        with torch.inference_mode():
            theirs = hf_model(torch.tensor([prompt])).logits[0, -1].float()
        diff = (ours - theirs).abs().max().item()
        assert diff < 1e-3, f"max abs logit difference {diff:.2e} on a {len(prompt)}-token prompt"


def test_real_model_batch_invariance_and_prefix_reuse(real_loaded, real_fused, real_tokenizer):
    prompts = prompt_set(real_tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    solo = []
    for p in prompts:
        eng = make_real_engine(real_loaded, real_fused, real_tokenizer)
        solo.append(run_to_completion(eng, [eng.submit(p, params)])[0].token_ids)
    # Concurrent, staggered, chunked prefill (64-token chunks), and a pool too small for all at once.
    eng = make_real_engine(real_loaded, real_fused, real_tokenizer, max_batched_tokens=64, num_blocks=90)
    handles = []
    for p in prompts:
        handles.append(eng.submit(p, params))
        eng.step()
    results = run_to_completion(eng, handles)
    assert [r.token_ids for r in results] == solo
    assert eng.blocks.num_used_blocks == 0
    # A repeated 200-token prompt computes at most one block of new prefill tokens.
    prompt = real_tokenizer.encode(long_text(3000))[:200]
    run_to_completion(eng, [eng.submit(prompt, params)])
    before = eng.counters["prefill_tokens"]
    again = run_to_completion(eng, [eng.submit(prompt, params)])[0]
    computed = eng.counters["prefill_tokens"] - before
    print(f"repeated 200-token prompt: {again.num_cached_tokens} cached, {computed} computed")
    assert computed <= eng.block_size and again.num_cached_tokens >= 192
