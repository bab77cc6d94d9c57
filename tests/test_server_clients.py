"""Real clients against a real gunicorn (wsgi:app, config/gunicorn.conf.py) serving the embedded
SmolLM2 on 127.0.0.1: the openai package, httpx-sse, websocket-client; disconnects; bad input.

One server for the session (the model loads once); it runs with an API key, so every client sends it.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import websocket

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-key-7f3a"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_BODY = 64 * 1024
MAX_MODEL_LEN = 2048
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc: subprocess.Popen, log: Path, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"gunicorn exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"/health never said ok:\n{log.read_text()[-4000:]}")


@contextmanager
def run_gunicorn(tmp: Path, config: Path):
    """gunicorn serving wsgi:app with this runtime config on a free loopback port; yields its base URL
    once /health says ok, and stops it (SIGTERM, then kill) afterwards."""
    port = free_port()
    log = tmp / "gunicorn.log"
    env = {**os.environ, "PAGEDECODE_CONFIG": str(config), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PAGEDECODE_API_KEY", None)
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "config/gunicorn.conf.py",
                                 "--bind", f"127.0.0.1:{port}", "wsgi:app"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, log)
        yield base
    finally:
        print("gunicorn log:", log)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """gunicorn serving wsgi:app; yields its base URL."""
    tmp = tmp_path_factory.mktemp("server")
    config = tmp / "runtime.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "model": {"path": None},
        "engine": {"backend": "auto", "block_size": 16, "kv_cache_mb": 64, "max_num_seqs": 16,
                   "max_batched_tokens": 512, "max_model_len": MAX_MODEL_LEN, "enable_prefix_caching": True},
        "server": {"max_concurrent_requests": 32, "max_queue_length": 32, "max_body_bytes": MAX_BODY,
                   "max_prompt_tokens": 4096, "api_key": API_KEY}}))
    with run_gunicorn(tmp, config) as base:
        yield base


@pytest.fixture(scope="session")
def openai_client(server):
    import openai
    with openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=120) as client:
        yield client


def engine_stats(base: str) -> dict:
    return httpx.get(base + "/stats", timeout=5).json()["engine"]


def metric(base: str, name: str) -> float:
    for line in httpx.get(base + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def idle_and_all_blocks_free(base: str) -> bool:
    s = engine_stats(base)
    return s["num_running"] == 0 and s["num_waiting"] == 0 and s["num_used_blocks"] == 0 \
        and s["num_free_blocks"] == s["num_blocks"]


def poll(predicate, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


USER = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


# ---- the openai package -------------------------------------------------------------------------
def test_openai_chat_completion_and_its_stream_agree(openai_client):
    full = openai_client.chat.completions.create(model="any", messages=USER, temperature=0, max_tokens=24)
    answer = full.choices[0].message.content
    assert "Paris" in answer and full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.completion_tokens > 0 and full.usage.prompt_tokens > 5
    stream = openai_client.chat.completions.create(model="any", messages=USER, temperature=0, max_tokens=24,
                                                   stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer  # greedy: the stream carries exactly the same tokens
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_openai_completions(openai_client):
    prompt = "The three primary colors are"
    full = openai_client.completions.create(model="any", prompt=prompt, max_tokens=12, temperature=0)
    assert full.choices[0].text and full.usage.completion_tokens == 12
    streamed = openai_client.completions.create(model="any", prompt=prompt, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full.choices[0].text
    assert [m.id for m in openai_client.models.list().data] == ["SmolLM2-135M-Instruct.Q4_1"]


def test_openai_logprobs(openai_client):
    full = openai_client.chat.completions.create(model="any", messages=USER, temperature=0, max_tokens=6,
                                                 logprobs=True, top_logprobs=3)
    entries = full.choices[0].logprobs.content
    assert len(entries) == full.usage.completion_tokens
    assert "".join(e.token for e in entries).startswith(full.choices[0].message.content[:5])
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].logprob >= e.logprob - 1e-4  # greedy picks the most likely token
    text = openai_client.completions.create(model="any", prompt="One, two,", max_tokens=3, logprobs=2)
    assert len(text.choices[0].logprobs.tokens) == 3 and len(text.choices[0].logprobs.top_logprobs[0]) == 2


def test_openai_client_sees_a_wrong_key_as_authentication_error(server):
    import openai
    with openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="any", messages=USER, max_tokens=4)


# ---- httpx-sse on /stream -----------------------------------------------------------------------
def test_httpx_sse_reads_stream_and_it_matches_generate(server):
    from httpx_sse import connect_sse
    body = {"prompt": "Once upon a time", "max_tokens": 20, "temperature": 0}
    expected = httpx.post(server + "/generate", json=body, headers=AUTH, timeout=60).json()
    events = []
    with httpx.Client(timeout=60, headers=AUTH) as client, connect_sse(client, "POST", server + "/stream",
                                                                      json=body) as source:
        events = [json.loads(sse.data) for sse in source.iter_sse()]
    deltas = [e for e in events if e["type"] == "delta"]
    assert len(deltas) >= 5 and events[-1]["type"] == "done"
    assert "".join(e["text"] for e in deltas) == expected["text"]
    assert events[-1]["usage"] == expected["usage"] and events[-1]["timing"]["ttft_s"] > 0


# ---- websocket-client: a conversation -----------------------------------------------------------
def ws_turn(ws, messages, max_tokens=48) -> tuple[str, dict]:
    ws.send(json.dumps({"type": "chat", "messages": messages, "params": {"temperature": 0, "max_tokens": max_tokens}}))
    text = ""
    while True:
        event = json.loads(ws.recv())
        if event["type"] == "delta":
            text += event["text"]
        elif event["type"] == "done":
            return text, event
        else:
            raise AssertionError(event)


def test_websocket_two_turn_conversation_remembers_the_name(server):
    # SmolLM2-135M (greedy) answers "Your name is Zork" with this system prompt; checked for first
    # answers of 24 to 96 tokens. Without the first turn it cannot know the name.
    system = [{"role": "system", "content": "You are a helpful assistant."}]
    url = server.replace("http://", "ws://") + "/ws/chat"
    ws = websocket.create_connection(url, header=[f"Authorization: Bearer {API_KEY}"], timeout=60)
    try:
        history = system + [{"role": "user", "content": "My name is Zork. Remember it."}]
        first, _ = ws_turn(ws, history)
        history += [{"role": "assistant", "content": first}, {"role": "user", "content": "What is my name?"}]
        second, done = ws_turn(ws, history, max_tokens=32)
        assert "Zork" in second
        assert done["usage"]["cached_tokens"] > 0  # the first turn's KV came from the prefix cache
        alone, _ = ws_turn(ws, system + [{"role": "user", "content": "What is my name?"}], max_tokens=32)
        assert "Zork" not in alone
    finally:
        ws.close()


# ---- disconnects --------------------------------------------------------------------------------
LONG = {"prompt": "Write a very long story about a dragon.", "max_tokens": 1500, "temperature": 0,
        "ignore_eos": True}


def test_dropping_an_sse_stream_aborts_and_frees_the_blocks(server):
    assert poll(lambda: idle_and_all_blocks_free(server), 10)
    aborted = metric(server, "pagedecode_requests_aborted_total")
    with httpx.Client(timeout=60, headers=AUTH) as client:
        with client.stream("POST", server + "/stream", json=LONG) as response:
            num_events, lines = 0, response.iter_lines()
            for line in lines:
                num_events += line.startswith("data: ")
                if num_events == 3:
                    break
            assert num_events == 3
            stats = engine_stats(server)
            assert stats["num_running"] == 1, (stats, list(lines))
    # the connection is closed here, mid-answer
    assert poll(lambda: idle_and_all_blocks_free(server), 1.0), engine_stats(server)
    assert metric(server, "pagedecode_requests_aborted_total") == aborted + 1


def test_dropping_a_websocket_aborts_and_frees_the_blocks(server):
    assert poll(lambda: idle_and_all_blocks_free(server), 10)
    url = server.replace("http://", "ws://") + "/ws/chat?api_key=" + API_KEY
    ws = websocket.create_connection(url, timeout=60)
    ws.send(json.dumps({"type": "chat", "prompt": LONG["prompt"], "params": {k: v for k, v in LONG.items()
                                                                            if k != "prompt"}}))
    for _ in range(3):
        assert json.loads(ws.recv())["type"] == "delta"
    assert engine_stats(server)["num_running"] == 1
    ws.close()
    assert poll(lambda: idle_and_all_blocks_free(server), 1.0), engine_stats(server)


def test_stop_frame_aborts_the_running_answer(server):
    url = server.replace("http://", "ws://") + "/ws/chat?api_key=" + API_KEY
    ws = websocket.create_connection(url, timeout=60)
    try:
        ws.send(json.dumps({"type": "chat", "prompt": LONG["prompt"], "params": {"max_tokens": 1500, "ignore_eos": True}}))
        assert json.loads(ws.recv())["type"] == "delta"
        ws.send(json.dumps({"type": "stop"}))
        while (event := json.loads(ws.recv()))["type"] == "delta":
            pass
        assert event["type"] == "done" and event["finish_reason"] == "abort"
        assert event["usage"]["completion_tokens"] < 1500
    finally:
        ws.close()
    assert poll(lambda: idle_and_all_blocks_free(server), 1.0)


# ---- bad input ----------------------------------------------------------------------------------
def _bad_requests():
    """(label, method, path, kwargs, expected status)."""
    j = {"headers": {**AUTH, "Content-Type": "application/json"}}
    chat = {"messages": USER}
    return [
        ("invalid JSON", "POST", "/generate", {**j, "content": b'{"prompt": "hi"'}, 400),
        ("JSON array body", "POST", "/generate", {**j, "content": b'["hi"]'}, 400),
        ("empty body", "POST", "/stream", {**j, "content": b""}, 400),
        ("prompt of the wrong type", "POST", "/generate", {**j, "json": {"prompt": 123}}, 400),
        ("no prompt or messages", "POST", "/generate", {**j, "json": {"max_tokens": 5}}, 400),
        ("messages not a list", "POST", "/stream", {**j, "json": {"messages": "hi"}}, 400),
        ("message with a bad role", "POST", "/v1/chat/completions",
         {**j, "json": {"messages": [{"role": "wizard", "content": "x"}]}}, 400),
        ("negative max_tokens", "POST", "/generate", {**j, "json": {"prompt": "hi", "max_tokens": -5}}, 400),
        ("huge max_tokens", "POST", "/v1/chat/completions", {**j, "json": {**chat, "max_tokens": 10**12}}, 400),
        ("max_tokens as a string", "POST", "/v1/completions", {**j, "json": {"prompt": "a", "max_tokens": "9"}}, 400),
        ("NaN temperature", "POST", "/generate", {**j, "content": b'{"prompt": "hi", "temperature": NaN}'}, 400),
        ("Infinity temperature", "POST", "/v1/chat/completions",
         {**j, "content": b'{"messages": [{"role": "user", "content": "x"}], "temperature": Infinity}'}, 400),
        ("negative temperature", "POST", "/stream", {**j, "json": {"prompt": "hi", "temperature": -1}}, 400),
        ("top_p of zero", "POST", "/generate", {**j, "json": {"prompt": "hi", "top_p": 0}}, 400),
        ("oversized body", "POST", "/generate", {**j, "json": {"prompt": "x" * (MAX_BODY + 10)}}, 413),
        ("prompt over the context", "POST", "/generate",
         {**j, "json": {"prompt": [42] * (MAX_MODEL_LEN + 10)}}, 400),
        ("prompt over max_prompt_tokens", "POST", "/v1/completions", {**j, "json": {"prompt": "hello " * 5000}}, 400),
        ("invalid UTF-8", "POST", "/generate", {**j, "content": b'{"prompt": "\xff\xfe caf\xe9"}'}, 400),
        ("unpaired surrogate", "POST", "/generate", {**j, "content": b'{"prompt": "\\ud800"}'}, 400),
        ("unknown field", "POST", "/generate", {**j, "json": {"prompt": "hi", "temprature": 0.5}}, 400),
        ("n > 1", "POST", "/v1/chat/completions", {**j, "json": {**chat, "n": 3}}, 400),
        ("empty batch", "POST", "/generate_batch", {**j, "json": {"prompts": []}}, 400),
        ("token id out of the vocabulary", "POST", "/generate", {**j, "json": {"prompt": [10**7]}}, 400),
        ("wrong method on /generate", "GET", "/generate", {**j}, 405),
        ("wrong method on chat completions", "DELETE", "/v1/chat/completions", {**j}, 405),
        ("no API key", "POST", "/generate", {"json": {"prompt": "hi"}}, 401),
        ("wrong API key", "POST", "/v1/chat/completions",
         {"json": chat, "headers": {"Authorization": "Bearer nope"}}, 401),
        ("unknown route", "POST", "/v2/generate", {**j, "json": {"prompt": "hi"}}, 404),
    ]


def test_malformed_requests_each_get_a_4xx_json_error_and_the_server_carries_on(server):
    cases = _bad_requests()
    assert len(cases) >= 20
    with httpx.Client(base_url=server, timeout=60) as client:
        for label, method, path, kwargs, status in cases:
            try:
                resp = client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise AssertionError(f"{label}: {exc!r}") from exc
            assert resp.status_code == status, (label, resp.status_code, resp.text[:300])
            error = resp.json()["error"]
            assert isinstance(error["message"], str) and error["message"] and error["type"], label
        ok = client.post("/generate", json={"prompt": "Hello", "max_tokens": 4, "temperature": 0}, headers=AUTH)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
    assert httpx.get(server + "/health").status_code == 200
    assert poll(lambda: idle_and_all_blocks_free(server), 5)


# ---- metrics ------------------------------------------------------------------------------------
def test_metrics_report_latency_histograms_and_tokens(server):
    httpx.post(server + "/generate", json={"prompt": "Count: one, two,", "max_tokens": 8}, headers=AUTH, timeout=60)
    assert metric(server, "pagedecode_time_to_first_token_seconds_count") >= 1
    assert metric(server, "pagedecode_inter_token_latency_seconds_count") >= 7
    assert metric(server, "pagedecode_generated_tokens_total") >= 8
    assert metric(server, "pagedecode_kv_blocks_total") > 0
    assert 0.0 <= metric(server, "pagedecode_prefix_cache_hit_rate") <= 1.0
