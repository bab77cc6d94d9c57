"""Tokenizer: GGUF build + disk cache, chat template, validation, incremental detokenization."""
from __future__ import annotations

import json
import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.tokenizer import IncrementalDetokenizer, Tokenizer, validate_messages
from engine.weights import default_model_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = ["Hello, world! How are you today?", "日本語のテキスト", "👍🏽 thumbs up 🇯🇵 flag",
         "mixed: naïve café – 日本語 👍🏽 and code `x = 1` 🇯🇵\n\tdone.", "  leading and trailing  ", ""]
CONVERSATION = [{"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "It is 4."},
                {"role": "user", "content": "And 3+3?"}]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizer-cache")


@pytest.fixture(scope="session")
def tokenizer(cache_dir):
    start = time.perf_counter()
    tok = Tokenizer.load(default_model_path(), cache_dir=cache_dir)
    print(f"\ntokenizer first load (build from GGUF + cache): {time.perf_counter() - start:.2f} s")
    return tok


@pytest.fixture(scope="session")
def hf_reference():
    """HF's own tokenizer built from the GGUF, independent of our cache."""
    from transformers import AutoTokenizer
    path = default_model_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_second_load_comes_from_cache(tokenizer, cache_dir, monkeypatch):
    import transformers

    entries = list(cache_dir.iterdir())
    assert len(entries) == 1 and (entries[0] / "tokenizer.json").is_file()

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached tokenizer was rebuilt from the GGUF")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_rebuild)
    start = time.perf_counter()
    again = Tokenizer.load(default_model_path(), cache_dir=cache_dir)
    print(f"\ntokenizer second load (from cache): {time.perf_counter() - start:.3f} s")
    for text in TEXTS:
        assert again.encode(text) == tokenizer.encode(text)
    assert again.apply_chat_template(CONVERSATION) == tokenizer.apply_chat_template(CONVERSATION)
    assert (again.eos_token_ids, again.bos_token_id, again.vocab_size) == (
        tokenizer.eos_token_ids, tokenizer.bos_token_id, tokenizer.vocab_size)


def test_properties(tokenizer):
    assert tokenizer.name == "SmolLM2-135M-Instruct.Q4_1"
    assert tokenizer.eos_token_ids == (2,) and tokenizer.bos_token_id == 1
    assert tokenizer.vocab_size == 49152
    assert tokenizer.hf.convert_ids_to_tokens(2) == "<|im_end|>"


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer, hf_reference, text):
    ids = tokenizer.encode(text)
    assert ids == hf_reference.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_decode_special_tokens(tokenizer):
    ids = [1] + tokenizer.encode("hi") + [2]
    assert tokenizer.decode(ids) == "hi"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>hi<|im_end|>"


def test_chat_template_matches_hf(tokenizer, hf_reference):
    ids = tokenizer.apply_chat_template(CONVERSATION)
    expected = hf_reference.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
    assert ids == list(expected)
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith(
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n")
    without = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    assert ids[:len(without)] == without and len(without) < len(ids)


def test_configured_chat_template(tmp_path, cache_dir, tokenizer):
    config = tmp_path / "chat_template.json"
    config.write_text(json.dumps({"template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
                                              "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"}))
    tok = Tokenizer.load(default_model_path(), cache_dir=cache_dir, chat_template_file=config)
    ids = tok.apply_chat_template(CONVERSATION[:2])
    assert tok.decode(ids) == "<user>What is 2+2?<assistant>It is 4.<assistant>"
    config.write_text(json.dumps({"template": 3}))
    with pytest.raises(ValueError, match="template"):
        Tokenizer.load(default_model_path(), cache_dir=cache_dir, chat_template_file=config)


@pytest.mark.parametrize("messages,field", [
    ([], "messages"), ("hi", "messages"), ([["user", "hi"]], r"messages\[0\]"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], r"messages\[1\]\.role"),
    ([{"role": "user", "content": 5}], r"messages\[0\]\.content"),
    ([{"content": "no role"}], r"messages\[0\]\.role")])
def test_message_validation(tokenizer, messages, field):
    with pytest.raises(ValueError, match=field):
        tokenizer.apply_chat_template(messages)


def test_validate_messages_keeps_role_and_content():
    assert validate_messages([{"role": "system", "content": "s", "name": "x"}]) == [{"role": "system", "content": "s"}]


def test_token_text(tokenizer):
    assert tokenizer.token_text(tokenizer.encode(" hello")[0]) == " hello"
    assert tokenizer.token_text(2) == "<|im_end|>"
    first = tokenizer.encode("日本")[0]                               # a partial character: shown as bytes
    assert "\ufffd" not in tokenizer.token_text(first) and "\\x" in tokenizer.token_text(first)


def test_load_from_folders(tokenizer, tmp_path, cache_dir):
    tokenizer.hf.save_pretrained(str(tmp_path / "hf"))
    from_folder = Tokenizer.load(tmp_path / "hf", cache_dir=cache_dir)
    assert from_folder.name == "hf" and from_folder.encode(TEXTS[3]) == tokenizer.encode(TEXTS[3])
    (tmp_path / "layout").mkdir()
    (tmp_path / "layout" / "manifest.json").write_text(json.dumps({"tokenizer_source": str(default_model_path())}))
    from_layout = Tokenizer.load(tmp_path / "layout", cache_dir=cache_dir)
    assert from_layout.name == tokenizer.name and from_layout.encode(TEXTS[1]) == tokenizer.encode(TEXTS[1])
    with pytest.raises(ValueError, match="not a .gguf"):
        Tokenizer.load(tmp_path, cache_dir=cache_dir)


# ---- incremental detokenization --------------------------------------------------------------------
def stream(tokenizer, ids, **kwargs) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, **kwargs)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


def assert_clean(deltas: list[str]) -> None:
    for delta in deltas:
        assert "\ufffd" not in delta
        assert not (delta and 0xD800 <= ord(delta[-1]) <= 0xDFFF)
        delta.encode("utf-8")                                         # no lone surrogate anywhere


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detok(tokenizer, text):
    ids = tokenizer.encode(text)
    deltas = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert_clean(deltas)
    if any(ord(ch) > 0x7F for ch in text):                            # multi-byte characters span tokens
        assert "" in deltas[:-1]


def test_incremental_detok_with_prompt_and_specials(tokenizer):
    prompt = tokenizer.apply_chat_template(CONVERSATION)
    ids = tokenizer.encode("Six 👍🏽 日本語") + [2]
    deltas = stream(tokenizer, ids, prompt_ids=prompt)
    assert "".join(deltas) == tokenizer.decode(ids) == "Six 👍🏽 日本語"
    assert_clean(deltas)
    shown = stream(tokenizer, ids, prompt_ids=prompt, skip_special_tokens=False)
    assert "".join(shown) == tokenizer.decode(ids, skip_special_tokens=False) == "Six 👍🏽 日本語<|im_end|>"


def test_flush_returns_held_back_bytes(tokenizer):
    partial = tokenizer.encode("日")[:1]
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.add(partial[0]) == ""
    assert detok.flush() == tokenizer.decode(partial) == "\ufffd"


def _byte_token_ids(tokenizer) -> list[int]:
    """Ids of the single-byte tokens 0x80..0xFF: random runs of them make partial and invalid UTF-8."""
    from engine.tokenizer import _byte_decoder
    chars = {b: ch for ch, b in _byte_decoder().items()}
    ids = [tokenizer.hf.backend_tokenizer.token_to_id(chars[b]) for b in range(0x80, 0x100)]
    return [i for i in ids if i is not None]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_incremental_detok_property(tokenizer, data):
    byte_ids = _byte_token_ids(tokenizer)
    assert len(byte_ids) > 100
    token = st.one_of(st.integers(0, tokenizer.vocab_size - 1), st.sampled_from(byte_ids))
    ids = data.draw(st.lists(token, max_size=40))
    skip = data.draw(st.booleans())
    deltas = stream(tokenizer, ids, skip_special_tokens=skip)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip)
    assert not any(d.endswith("\ufffd") for d in deltas[:-1])        # only flush may end mid-character
