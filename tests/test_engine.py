"""Engine on the tiny model: batch invariance, chunked prefill, paging under pressure, aborts, prefix cache."""
from __future__ import annotations

import math
import random

import pytest

from engine.sequence import SamplingParams
from engine.config import EngineConfig
from tests.conftest import TINY, make_tiny_engine, run_to_completion

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, TINY.vocab_size) for _ in range(rng.randrange(1, 90))] for _ in range(n)]


def solo(prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
    eng = make_tiny_engine()
    return run_to_completion(eng, [eng.submit(prompt, params)])[0].token_ids


def assert_all_free(eng) -> None:
    eng.blocks.check_invariants()
    assert eng.blocks.num_used_blocks == 0
    assert eng.blocks.num_free_blocks == eng.num_blocks


def test_concurrent_equals_solo_with_staggered_arrival_and_chunked_prefill():
    ps = prompts(6)
    expected = [solo(p) for p in ps]
    eng = make_tiny_engine(max_batched_tokens=16)   # prompts up to 89 tokens: several chunks each
    handles = []
    for i, p in enumerate(ps):
        handles.append(eng.submit(p, GREEDY))
        for _ in range(i):                          # the next one arrives a few steps later
            eng.step()
    results = run_to_completion(eng, handles)
    assert [r.token_ids for r in results] == expected
    assert_all_free(eng)


def test_paging_under_pressure_preempts_and_still_matches_solo():
    ps = prompts(8, seed=2)
    expected = [solo(p) for p in ps]
    # 12 blocks of 16 = 192 slots: far too few for 8 sequences of up to ~110 tokens at once.
    eng = make_tiny_engine(num_blocks=12, max_batched_tokens=32)
    handles = [eng.submit(p, GREEDY) for p in ps]
    steps = 0
    while eng.has_work():
        eng.step()
        eng.blocks.check_invariants()
        steps += 1
        assert steps < 5000
    results = [h.result(timeout=0) for h in handles]
    assert eng.counters["preemptions"] > 0, "the pool was meant to be too small"
    assert [r.token_ids for r in results] == expected
    assert_all_free(eng)


def test_abort_frees_blocks_at_the_next_step():
    eng = make_tiny_engine()
    keep = eng.submit(prompts(1)[0], GREEDY)
    drop = eng.submit(list(range(3, 60)), SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True))
    for _ in range(3):
        eng.step()
    assert eng.blocks.num_used_blocks > 0
    drop.cancel()
    eng.step()
    out = drop.result(timeout=0)
    assert out.finish_reason == "abort"
    run_to_completion(eng, [keep])
    assert_all_free(eng)


def test_prefix_cache_serves_a_repeated_prompt():
    eng = make_tiny_engine(max_batched_tokens=512)
    prompt = prompts(1, seed=5)[0] * 3               # long enough to fill several blocks
    prompt = (prompt * 4)[:200]
    first = run_to_completion(eng, [eng.submit(prompt, GREEDY)])[0]
    before = eng.counters["prefill_tokens"]
    second = run_to_completion(eng, [eng.submit(prompt, GREEDY)])[0]
    computed = eng.counters["prefill_tokens"] - before
    assert second.num_cached_tokens == 192
    assert computed <= eng.block_size, f"second run computed {computed} prefill tokens"
    assert second.token_ids == first.token_ids


def test_seeded_sampling_is_independent_of_the_batch():
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, max_tokens=16, seed=1234, ignore_eos=True)
    p = prompts(1, seed=9)[0]
    alone = solo(p, params)
    eng = make_tiny_engine()
    others = [eng.submit(q, SamplingParams(temperature=1.0, max_tokens=16, seed=7, ignore_eos=True))
              for q in prompts(4, seed=10)]
    mine = eng.submit(p, params)
    results = run_to_completion(eng, others + [mine])
    assert results[-1].token_ids == alone


def test_stop_token_and_max_tokens_and_context_limit():
    eng = make_tiny_engine(max_model_len=40)
    greedy_out = solo([5, 6, 7])
    stop_at = greedy_out[3]
    h1 = eng.submit([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=(stop_at,)))
    h2 = eng.submit([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    h3 = eng.submit(list(range(3, 38)), SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
    r1, r2, r3 = run_to_completion(eng, [h1, h2, h3])
    assert r1.finish_reason == "stop" and r1.token_ids[-1] == stop_at
    assert r1.token_ids == greedy_out[: greedy_out.index(stop_at) + 1]
    assert r2.finish_reason == "length" and len(r2.token_ids) == 5
    assert r3.finish_reason == "length" and 35 + len(r3.token_ids) == 40
    assert_all_free(eng)


@pytest.mark.parametrize("bad, name", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -3}, "max_tokens"), ({"max_tokens": 2.5}, "max_tokens"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.nan}, "temperature"), ({"temperature": math.inf}, "temperature"),
    ({"top_k": -1}, "top_k"), ({"min_p": 2.0}, "min_p"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": math.nan}, "presence_penalty"), ({"logprobs": 100}, "logprobs"),
    ({"temperature": "hot"}, "temperature"), ({"seed": -1}, "seed"), ({"stop": [""]}, "stop"),
])
def test_bad_parameters_name_the_parameter(bad, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**bad)


def test_bad_prompts_are_value_errors():
    eng = make_tiny_engine(max_model_len=50)
    with pytest.raises(ValueError, match="context"):
        eng.submit(list(range(3, 60)), GREEDY)
    with pytest.raises(ValueError, match="empty"):
        eng.submit([], GREEDY)
    with pytest.raises(ValueError, match="token ids"):
        eng.submit([1, TINY.vocab_size], GREEDY)
    with pytest.raises(ValueError, match="tokenizer"):
        eng.submit("text needs a tokenizer", GREEDY)
    assert not eng.has_work()


def test_background_thread_serves_concurrent_requests():
    eng = make_tiny_engine().start()
    try:
        ps = prompts(4, seed=3)
        handles = [eng.submit(p, GREEDY) for p in ps]
        results = [h.result(timeout=60) for h in handles]
        assert [r.token_ids for r in results] == [solo(p) for p in ps]
    finally:
        eng.stop()
    assert_all_free(eng)


def test_max_batched_tokens_defaults_to_the_backend():
    """EngineConfig.max_batched_tokens None (the shipped YAML's null) takes the backend's chunk budget: 512
    on the CPU backends; a backend with a larger default (CUDA: 8192) gets it; a set value wins."""
    from engine.backends.torch_ref import TorchRefBackend
    from engine.config import EngineConfig
    from engine.engine import Engine

    class BigChunks(TorchRefBackend):
        default_max_batched_tokens = 8192

    assert Engine(TINY, TorchRefBackend(TINY), EngineConfig(num_blocks=8)).config.max_batched_tokens == 512
    assert Engine(TINY, BigChunks(TINY), EngineConfig(num_blocks=8)).config.max_batched_tokens == 8192
    assert Engine(TINY, BigChunks(TINY), EngineConfig(num_blocks=8, max_batched_tokens=64)).scheduler.config \
        .max_batched_tokens == 64
    with pytest.raises(ValueError, match="max_batched_tokens"):
        EngineConfig(max_batched_tokens=0)


def test_unset_limits_take_the_backends_defaults():
    """max_num_seqs / max_batched_tokens / kv_cache_mb left unset: each is the backend's (a GPU backend runs
    more sequences, bigger chunks and a cache sized to the card); set, they are taken as given."""
    from engine.backends.torch_ref import TorchRefBackend
    from engine.engine import Engine
    from tests.conftest import TINY, tiny_hf_tensors
    from engine.model import fuse_weights

    class Big(TorchRefBackend):
        default_max_num_seqs, default_max_batched_tokens = 96, 1024

        def default_kv_cache_bytes(self, max_batched_tokens, max_num_seqs):
            assert (max_batched_tokens, max_num_seqs) == (1024, 96)
            return 40 * self.kv_bytes_per_block(16) + 5

    backend = Big(TINY)
    backend.load_weights(fuse_weights(tiny_hf_tensors(), TINY))
    eng = Engine(TINY, backend, EngineConfig(backend="torch"))
    assert (eng.config.max_num_seqs, eng.config.max_batched_tokens, eng.num_blocks) == (96, 1024, 40)
    eng = Engine(TINY, backend, EngineConfig(backend="torch", max_num_seqs=3, max_batched_tokens=64, kv_cache_mb=1))
    assert (eng.config.max_num_seqs, eng.config.max_batched_tokens) == (3, 64)
    assert eng.num_blocks == 2**20 // backend.kv_bytes_per_block(16)
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)


def test_given_num_blocks_never_sizes_a_cache():
    """num_blocks set: the backend is not asked to size a cache (on a full GPU that could fail for nothing)."""
    from engine.backends.torch_ref import TorchRefBackend
    from engine.engine import Engine
    from engine.model import fuse_weights
    from tests.conftest import tiny_hf_tensors

    class NoRoom(TorchRefBackend):
        def default_kv_cache_bytes(self, max_batched_tokens, max_num_seqs):
            raise RuntimeError("no room for a KV cache")

    backend = NoRoom(TINY)
    backend.load_weights(fuse_weights(tiny_hf_tensors(), TINY))
    assert Engine(TINY, backend, EngineConfig(backend="torch", num_blocks=12)).num_blocks == 12
    with pytest.raises(RuntimeError, match="no room"):
        Engine(TINY, backend, EngineConfig(backend="torch"))
