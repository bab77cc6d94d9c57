"""The Decoder API end to end on the embedded SmolLM2 (reference backend): generate, stream, chat."""
from __future__ import annotations

import time

import pytest

from engine.config import EngineConfig
from engine.decoder import TorchDecoder
from engine.sequence import SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def decoder():
    start = time.perf_counter()
    dec = TorchDecoder(None, EngineConfig(backend="torch", kv_cache_mb=64))
    first = dec.generate("Hello", max_tokens=1)
    print(f"\nTorchDecoder: constructed + first token in {time.perf_counter() - start:.2f} s")
    assert first.num_generated_tokens == 1
    yield dec
    dec.close()


def test_stream_deltas_concatenate_to_generate(decoder):
    prompt = "List the planets of the solar system:"
    full = decoder.generate(prompt, max_tokens=40)
    deltas = list(decoder.stream(prompt, max_tokens=40))
    assert len(deltas) > 5
    assert "".join(deltas) == full.text
    assert "\ufffd" not in full.text


def test_chat_reuses_earlier_turns_from_the_prefix_cache(decoder):
    messages = [{"role": "system", "content": "You are a helpful assistant who answers briefly."},
                {"role": "user", "content": "My name is Zork and I live on the moon. Please remember this."}]
    first = decoder.chat(messages, max_tokens=48)
    messages += [{"role": "assistant", "content": first.text},
                 {"role": "user", "content": "What is my name?"}]
    second = decoder.chat(messages, max_tokens=24)
    turn1 = len(decoder.tokenizer.apply_chat_template(messages[:2]))
    print(f"turn 2: {second.num_cached_tokens} of {second.num_prompt_tokens} prompt tokens from the cache")
    assert second.num_cached_tokens >= (turn1 // 16) * 16
    assert "Zork" in second.text


def test_stop_string_ends_the_text_before_it(decoder):
    prompt = "Count from one to ten in words: one, two, three,"
    free = decoder.generate(prompt, max_tokens=30).text
    assert "six" in free
    cut = decoder.generate(prompt, max_tokens=30, stop=("six",))
    assert cut.finish_reason == "stop"
    assert cut.text == free[: free.index("six")]


def test_seeded_sampling_repeats(decoder):
    ask = [{"role": "user", "content": "Write a sentence about cats."}]
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=42, max_tokens=24, min_tokens=8)
    a = decoder.chat(ask, params)
    b = decoder.chat(ask, params)
    c = decoder.chat(ask, SamplingParams(temperature=0.8, top_p=0.9, seed=43, max_tokens=24, min_tokens=8))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_prompt_over_the_context_is_a_value_error(decoder):
    with pytest.raises(ValueError, match="context"):
        decoder.generate([5] * (decoder.engine.max_model_len + 1), max_tokens=1)
    assert decoder.engine.stats()["num_running"] == 0


def test_reload_gives_the_old_kv_cache_back_before_sizing_the_new(tiny_model, monkeypatch):
    """Decoder.load_weights on a running Decoder: the old engine stops and its backend gives its KV cache
    back before the new backend sizes one (on a GPU the old cache would otherwise leave no room)."""
    from engine import decoder as D
    from engine.backends.torch_ref import TorchRefBackend
    from engine.tokenizer import Tokenizer
    events = []

    class Recording(TorchRefBackend):
        def release_kv_cache(self):
            events.append(("release", id(self)))

        def default_kv_cache_bytes(self, max_batched_tokens, max_num_seqs):
            events.append(("size", id(self)))
            return 2**20

    monkeypatch.setattr(D, "make_backend", lambda name, config, num_threads=None: Recording(config))
    monkeypatch.setattr(Tokenizer, "load", staticmethod(lambda *a, **k: None))
    dec = D.Decoder(tiny_model, EngineConfig(backend="torch"))
    first = dec.engine
    dec.load_weights(tiny_model)
    assert first._thread is None and dec.engine is not first
    old, new = id(first.backend), id(dec.engine.backend)
    # each Engine releases its own backend's cache before sizing one; the reload releases the old engine's
    assert events == [("release", old), ("size", old), ("release", old), ("release", new), ("size", new)]
    dec.close()
