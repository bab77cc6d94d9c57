"""webapp/schema.py: JSON in -> typed requests (or a 400 naming the field), engine outputs -> JSON."""
from __future__ import annotations

import json

import pytest

from engine.request import RequestOutput
from engine.sequence import SamplingParams
from webapp import schema
from webapp.schema import ApiError

CTX = 1024


def gen(data: dict, **kw):
    return schema.parse_generate(data, max_model_len=CTX, **kw)


def rejects(fn, data, param=None, status=400) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(data)
    err = info.value
    assert err.status == status
    assert err.param == param, err.message
    body = err.body()["error"]
    assert body["message"] and body["type"] == "invalid_request_error"
    return err


# ---- bodies -----------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, needle", [
    (b"", "empty"), (b"{", "invalid JSON"), (b"[1, 2]", "JSON object"), (b'"text"', "JSON object"),
    (b"\xff\xfe{}", "UTF-8"), (b'{"prompt": "caf\xe9"}', "UTF-8"), (b'{"temperature": NaN}', "NaN"),
    (b'{"temperature": Infinity}', "Infinity"), (b'{"temperature": -Infinity}', "Infinity"),
])
def test_load_json_rejects_what_is_not_a_strict_json_object(raw, needle):
    with pytest.raises(ApiError) as info:
        schema.load_json(raw)
    assert needle in info.value.message and info.value.status == 400


def test_load_json_accepts_utf8_text():
    assert schema.load_json('{"prompt": "héllo ✓"}'.encode()) == {"prompt": "héllo ✓"}


# ---- /generate, /stream, WebSocket ------------------------------------------------------------
def test_parse_generate_text_prompt_and_params():
    req = gen({"prompt": "Hi", "max_tokens": 5, "temperature": 0, "top_k": 4, "top_p": 0.5, "stop": "\n",
               "seed": 3})
    assert req.prompt == "Hi" and req.messages is None
    assert req.params == SamplingParams(max_tokens=5, temperature=0, top_k=4, top_p=0.5, stop=("\n",), seed=3)


def test_parse_generate_token_ids_messages_and_nested_params():
    assert gen({"prompt": [1, 2, 3]}).prompt == [1, 2, 3]
    req = gen({"type": "chat", "messages": [{"role": "user", "content": "x"}], "params": {"max_tokens": 7}})
    assert req.messages == [{"role": "user", "content": "x"}] and req.params.max_tokens == 7
    parts = gen({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                           {"type": "text", "text": "b"}]}]})
    assert parts.messages[0]["content"] == "ab"


def test_defaults_apply_before_the_request_and_null_means_default():
    req = gen({"prompt": "x", "temperature": None}, defaults={"max_tokens": 9, "temperature": 0.0})
    assert req.params.max_tokens == 9 and req.params.temperature == 0.0
    assert gen({"prompt": "x", "max_tokens": 3}, defaults={"max_tokens": 9}).params.max_tokens == 3


def test_integral_floats_count_as_integers():
    assert gen({"prompt": "x", "max_tokens": 4.0}).params.max_tokens == 4


@pytest.mark.parametrize("data, param", [
    ({}, "prompt"),
    ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "messages"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 12}, "prompt"),
    ({"prompt": [1, "2"]}, "prompt"),
    ({"prompt": [True]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "\ud800"}, "prompt"),
    ({"messages": "hello"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": ["hi"]}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**12}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "10"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "temperature": -0.1}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "temperature": 1e400}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "top_k": -3}, "top_k"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "stop": 3}, "stop"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "ignore_eos": "yes"}, "ignore_eos"),
    ({"prompt": "x", "params": [1]}, "params"),
    ({"prompt": "x", "temprature": 0.5}, "temprature"),
])
def test_parse_generate_rejects_with_the_field_named(data, param):
    rejects(gen, data, param)


def test_parse_batch():
    reqs = schema.parse_batch({"prompts": ["a", [5, 6]], "max_tokens": 3}, max_model_len=CTX)
    assert [r.prompt for r in reqs] == ["a", [5, 6]] and all(r.params.max_tokens == 3 for r in reqs)
    batch = lambda d: schema.parse_batch(d, max_model_len=CTX)  # noqa: E731
    rejects(batch, {"prompts": []}, "prompts")
    rejects(batch, {"prompts": "a"}, "prompts")
    rejects(batch, {"prompts": ["a"] * (schema.MAX_BATCH_PROMPTS + 1)}, "prompts")
    rejects(batch, {"prompts": ["a", 3]}, "prompts")


# ---- OpenAI -----------------------------------------------------------------------------------
def chat(data, **kw):
    return schema.parse_openai_chat(data, max_model_len=CTX, **kw)


def completion(data, **kw):
    return schema.parse_openai_completion(data, max_model_len=CTX, **kw)


def test_parse_openai_chat():
    req = chat({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 4,
                "stream": True, "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 2,
                "user": "ignored", "n": 1})
    assert req.stream and req.include_usage and req.want_logprobs and req.model == "m"
    assert req.params.max_tokens == 4 and req.params.logprobs == 2


def test_parse_openai_completion_prompts():
    assert completion({"prompt": "a"}).prompts == ["a"]
    assert completion({"prompt": ["a", "b"]}).prompts == ["a", "b"]
    assert completion({"prompt": [1, 2]}).prompts == [[1, 2]]
    assert completion({"prompt": [[1, 2], [3]]}).prompts == [[1, 2], [3]]
    assert completion({"prompt": "a", "logprobs": 3}).params.logprobs == 3


@pytest.mark.parametrize("data, param", [
    ({}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "model": 5}, "model"),
    ({"messages": [{"role": "user", "content": "x"}], "frequency_penalty": 3}, "frequency_penalty"),
    ({"messages": [{"role": "user", "content": "x"}], "bogus": 1}, "bogus"),
])
def test_parse_openai_chat_rejects(data, param):
    rejects(chat, data, param)


@pytest.mark.parametrize("data, param", [
    ({}, "prompt"), ({"prompt": "a", "echo": True}, "echo"), ({"prompt": "a", "suffix": "z"}, "suffix"),
    ({"prompt": ["a", "b"], "stream": True}, "prompt"), ({"prompt": "a", "best_of": 3}, "best_of"),
    ({"prompt": "a", "logprobs": 50}, "logprobs"),
])
def test_parse_openai_completion_rejects(data, param):
    rejects(completion, data, param)


# ---- events out -------------------------------------------------------------------------------
def test_events_and_sse_framing():
    out = RequestOutput("r", "<b>hi</b>", [4, 5], True, "stop", num_prompt_tokens=3, num_generated_tokens=2,
                        num_cached_tokens=1)
    assert schema.delta_event(out) == {"type": "delta", "text": "<b>hi</b>", "token_ids": [4, 5]}
    done = schema.done_event(out, {"ttft_s": 0.1})
    assert done["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "cached_tokens": 1}
    frame = schema.sse(schema.delta_event(out))
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n") and frame.count(b"\n") == 2
    assert json.loads(frame[6:])["text"] == "<b>hi</b>"
    assert schema.sse("[DONE]") == b"data: [DONE]\n\n"
    newline = schema.sse({"type": "delta", "text": "a\n\nb"})
    assert newline.count(b"\n") == 2  # newlines inside text are escaped: one event stays one event
