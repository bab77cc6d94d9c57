"""The web app in-process: the tiny-model Engine (token-id prompts) for engine behaviour, and a
scripted engine (text, exact pieces) for shapes, limits, loading, WebSocket and disconnects."""
from __future__ import annotations

import itertools
import json
import threading

import pytest
import websocket
from werkzeug.serving import make_server

from engine.request import RequestHandle, RequestOutput
from tests.conftest import make_tiny_engine, run_to_completion, wait_until
from engine.sequence import SamplingParams
from webapp import ROOT, create_app


# ---- stand-ins ----------------------------------------------------------------------------------
class ByteTokenizer:
    """Text <-> UTF-8 bytes as ids 3..258; a chat is <role>content lines."""

    eos_token_ids = (2,)

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode()]

    def decode(self, ids) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", "replace")

    def apply_chat_template(self, messages) -> list[int]:
        return self.encode("".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>")


class ScriptedEngine:
    """Stands in for Engine: answers each request with answer(prompt_text) pieces, one per delay_s,
    on its own thread; abort() ends it like the real engine does (finish_reason "abort")."""

    max_model_len = 512

    def __init__(self, answer=lambda prompt: ["Hello", ",", " world", "!"], delay_s: float = 0.005,
                 fail: bool = False):
        self.answer, self.delay_s, self.fail = answer, delay_s, fail
        self.tokenizer = ByteTokenizer()
        self.prompts: list[str] = []
        self.aborted: list[str] = []
        self._running: dict[str, threading.Event] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def submit(self, prompt, params: SamplingParams, *, messages=None, request_id=None) -> RequestHandle:
        return self._start(self._run, "fake", prompt, params, request_id)

    def _start(self, target, prefix: str, prompt, params, request_id) -> RequestHandle:
        """Register a request and run target(rid, handle, prompt, params, stop) on its own thread."""
        assert isinstance(prompt, list), "the web app tokenizes at the edge and submits ids"
        rid = request_id or f"{prefix}-{next(self._ids)}"
        handle, stop = RequestHandle(rid, self), threading.Event()
        with self._lock:
            self._running[rid] = stop
            self.prompts.append(self.tokenizer.decode(prompt))
        threading.Thread(target=target, args=(rid, handle, prompt, params, stop), daemon=True).start()
        return handle

    def _run(self, rid, handle, prompt, params, stop) -> None:
        pieces, n = self.answer(self.tokenizer.decode(prompt)), 0
        for piece in pieces[: params.max_tokens]:
            if stop.wait(self.delay_s):
                break
            n += 1
            handle.put(RequestOutput(rid, piece, [n + 2], num_prompt_tokens=len(prompt), num_generated_tokens=n))
            if self.fail:
                handle.put(RequestOutput(rid, "", [], True, "error", error="scripted failure"))
                break
        reason = "abort" if stop.is_set() else ("length" if n == params.max_tokens else "stop")
        with self._lock:
            del self._running[rid]
            if stop.is_set():
                self.aborted.append(rid)
        if not self.fail:
            handle.put(RequestOutput(rid, "", [], True, reason, len(prompt), n))

    def abort(self, request_id: str) -> None:
        with self._lock:
            stop = self._running.get(request_id)
        if stop is not None:
            stop.set()

    def stats(self) -> dict:
        with self._lock:
            n = len(self._running)
        return {"num_running": n, "num_waiting": 0, "num_blocks": 8, "num_free_blocks": 8 - n,
                "num_used_blocks": n, "kv_cache_usage": n / 8, "prefix_cache_hit_rate": 0.0,
                "tokens_generated": 0, "requests_finished": 0, "preemptions": 0, "max_model_len": 512,
                "backend": "scripted"}


def sse_events(body: bytes) -> list:
    """`data:` payloads of an SSE body (JSON decoded; [DONE] kept as a string)."""
    out = []
    for block in body.decode().split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                payload = line[6:]
                out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


# ---- fixtures -----------------------------------------------------------------------------------
@pytest.fixture
def tiny():
    eng = make_tiny_engine().start()
    yield eng
    eng.stop()


@pytest.fixture
def tiny_client(tiny):
    return create_app({"TESTING": True}, engine=tiny).test_client()


@pytest.fixture
def scripted():
    return ScriptedEngine()


@pytest.fixture
def client(scripted):
    return create_app({"TESTING": True}, engine=scripted).test_client()


GREEDY = {"temperature": 0, "ignore_eos": True}


def solo(prompt: list[int], max_tokens: int) -> list[int]:
    eng = make_tiny_engine()
    params = SamplingParams(max_tokens=max_tokens, **GREEDY)
    return run_to_completion(eng, [eng.submit(prompt, params)])[0].token_ids


def all_blocks_free(eng) -> bool:
    s = eng.stats()
    return s["num_running"] == 0 and s["num_waiting"] == 0 and s["num_free_blocks"] == s["num_blocks"]


# ---- the tiny engine: the routes drive the real scheduler ---------------------------------------
def test_generate_batch_and_stream_match_the_engine_run_alone(tiny_client):
    prompts = [[5, 9, 33, 4], [100, 3], list(range(3, 40))]
    expected = [solo(p, 12) for p in prompts]
    one = tiny_client.post("/generate", json={"prompt": prompts[0], "max_tokens": 12, **GREEDY})
    assert one.status_code == 200 and one.json["token_ids"] == expected[0]
    assert one.json["usage"]["completion_tokens"] == 12 and one.json["finish_reason"] == "length"
    batch = tiny_client.post("/generate_batch", json={"prompts": prompts, "max_tokens": 12, **GREEDY})
    assert [r["token_ids"] for r in batch.json["results"]] == expected
    events = sse_events(tiny_client.post("/stream", json={"prompt": prompts[2], "max_tokens": 12, **GREEDY}).data)
    assert [e["type"] for e in events] == ["delta"] * 12 + ["done"]
    assert sum((e["token_ids"] for e in events[:-1]), []) == expected[2]
    assert events[-1]["usage"]["prompt_tokens"] == len(prompts[2])


def test_closing_a_stream_mid_answer_aborts_and_frees_every_block(tiny, tiny_client):
    resp = tiny_client.post("/stream", json={"prompt": [7] * 40, "max_tokens": 900, **GREEDY}, buffered=False)
    chunks = resp.response if hasattr(resp, "response") else iter(resp.iter_encoded())
    got = [next(chunks) for _ in range(3)]
    assert all(c.startswith(b"data: ") for c in got)
    assert tiny.stats()["num_running"] == 1
    resp.close()  # what a WSGI server does when the client goes away
    assert wait_until(lambda: all_blocks_free(tiny), 1.0), tiny.stats()
    metrics = tiny_client.get("/metrics").data.decode()
    assert "pagedecode_requests_running 0.0" in metrics and "pagedecode_requests_aborted_total 1.0" in metrics


def test_closing_a_stream_before_its_first_byte_still_aborts(tiny, tiny_client):
    resp = tiny_client.post("/stream", json={"prompt": [9] * 20, "max_tokens": 900, **GREEDY}, buffered=False)
    resp.close()  # the generator never started: call_on_close must still cancel
    assert wait_until(lambda: all_blocks_free(tiny), 1.0), tiny.stats()
    assert tiny_client.get("/stats").json["server"]["active"] == 0


def test_prompt_longer_than_the_context_is_a_400(tiny_client, tiny):
    resp = tiny_client.post("/generate", json={"prompt": [5] * tiny.max_model_len})
    assert resp.status_code == 400 and resp.json["error"]["param"] == "prompt"
    assert "tokens" in resp.json["error"]["message"]
    bad_id = tiny_client.post("/generate", json={"prompt": [100000]})
    assert bad_id.status_code == 400 and "token ids" in bad_id.json["error"]["message"]


def test_max_prompt_tokens_limit(tiny):
    c = create_app({"TESTING": True, "MAX_PROMPT_TOKENS": 8}, engine=tiny).test_client()
    assert c.post("/generate", json={"prompt": [5] * 8, "max_tokens": 1}).status_code == 200
    resp = c.post("/generate", json={"prompt": [5] * 9, "max_tokens": 1})
    assert resp.status_code == 400 and "max_prompt_tokens 8" in resp.json["error"]["message"]


# ---- limits -------------------------------------------------------------------------------------
def test_past_max_concurrent_and_queue_the_answer_is_429():
    eng = ScriptedEngine(answer=lambda p: ["x"] * 500, delay_s=0.01)
    c = create_app({"TESTING": True, "MAX_CONCURRENT_REQUESTS": 1, "MAX_QUEUE_LENGTH": 0}, engine=eng).test_client()
    first = c.post("/stream", json={"prompt": "a", "max_tokens": 500}, buffered=False)
    busy = c.post("/generate", json={"prompt": "b"})
    assert busy.status_code == 429
    assert busy.json["error"]["type"] == "rate_limit_error" and "busy" in busy.json["error"]["message"]
    assert c.post("/v1/completions", json={"prompt": "b"}).status_code == 429
    first.close()
    assert wait_until(lambda: c.get("/stats").json["server"]["active"] == 0)
    assert c.post("/generate", json={"prompt": "b", "max_tokens": 2}).status_code == 200


def test_queued_requests_wait_for_a_slot_then_run():
    eng = ScriptedEngine(answer=lambda p: ["y"] * 5, delay_s=0.01)
    app = create_app({"TESTING": True, "MAX_CONCURRENT_REQUESTS": 1, "MAX_QUEUE_LENGTH": 4}, engine=eng)
    results = []

    def call():
        results.append(app.test_client().post("/generate", json={"prompt": "q"}).status_code)
    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [200] * 4
    batch = app.test_client().post("/generate_batch", json={"prompts": ["a", "b"]})
    assert batch.status_code == 400 and "max_concurrent_requests" in batch.json["error"]["message"]


def test_oversized_body_is_413_json(scripted):
    c = create_app({"TESTING": True, "MAX_CONTENT_LENGTH": 1000}, engine=scripted).test_client()
    resp = c.post("/generate", data=json.dumps({"prompt": "x" * 2000}), content_type="application/json")
    assert resp.status_code == 413 and "1000 bytes" in resp.json["error"]["message"]


def test_api_key_guards_every_generating_route(scripted):
    c = create_app({"TESTING": True, "API_KEY": "sekret"}, engine=scripted).test_client()
    routes = [("/generate", {"prompt": "x"}), ("/generate_batch", {"prompts": ["x"]}), ("/stream", {"prompt": "x"}),
              ("/v1/completions", {"prompt": "x"}),
              ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})]
    for path, body in routes:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "sekret"}):
            resp = c.post(path, json=body, headers=headers)
            assert resp.status_code == 401 and resp.json["error"]["type"] == "authentication_error", (path, headers)
        assert c.post(path, json=body, headers={"Authorization": "Bearer sekret"}).status_code == 200, path
    for path in ("/", "/health", "/metrics", "/v1/models"):
        assert c.get(path).status_code == 200, path


def test_api_key_from_the_environment(scripted, monkeypatch):
    monkeypatch.setenv("PAGEDECODE_API_KEY", "from-env")
    c = create_app({"TESTING": True}, engine=scripted).test_client()
    assert c.post("/generate", json={"prompt": "x"}).status_code == 401
    assert c.post("/generate", json={"prompt": "x"}, headers={"Authorization": "Bearer from-env"}).status_code == 200


def test_runtime_config_file_sets_the_server_limits(tmp_path, scripted, monkeypatch):
    path = tmp_path / "runtime.yaml"
    path.write_text("server:\n  max_body_bytes: 500\n  api_key: k1\n  max_prompt_tokens: 3\n")
    monkeypatch.setenv("PAGEDECODE_CONFIG", str(path))
    app = create_app({"TESTING": True}, engine=scripted)
    assert app.config["MAX_CONTENT_LENGTH"] == 500 and app.config["API_KEY"] == "k1"
    path.write_text("server:\n  max_body_byte: 500\n")
    with pytest.raises(ValueError, match="max_body_byte"):
        create_app({"TESTING": True}, engine=scripted)


# ---- loading ------------------------------------------------------------------------------------
def test_health_is_503_while_the_model_loads_then_200(scripted):
    release = threading.Event()

    def factory():
        release.wait(10)
        return scripted, "slow-model", None
    c = create_app({"TESTING": True, "ENGINE_FACTORY": factory}).test_client()
    health = c.get("/health")
    assert health.status_code == 503 and health.json["status"] == "loading"
    gen = c.post("/generate", json={"prompt": "x"})
    assert gen.status_code == 503 and "loading" in gen.json["error"]["message"]
    assert c.get("/").status_code == 200 and "pagedecode_model_ready 0.0" in c.get("/metrics").data.decode()
    release.set()
    assert wait_until(lambda: c.get("/health").status_code == 200)
    assert c.get("/health").json["model"] == "slow-model"
    assert c.post("/generate", json={"prompt": "x"}).json["text"] == "Hello, world!"


def test_a_failed_load_is_reported_by_health():
    def factory():
        raise RuntimeError("no weights here")
    c = create_app({"TESTING": True, "ENGINE_FACTORY": factory}).test_client()
    assert wait_until(lambda: c.get("/health").json["status"] == "error")
    health = c.get("/health")
    assert health.status_code == 503 and "no weights here" in health.json["error"]["message"]


# ---- shapes (scripted engine) -------------------------------------------------------------------
def test_generate_returns_text_exactly_as_produced():
    eng = ScriptedEngine(answer=lambda p: ["<script>alert(1)</script>", " & <img src=x onerror=alert(2)>"])
    resp = create_app({"TESTING": True}, engine=eng).test_client().post("/generate", json={"prompt": "x"})
    assert resp.json["text"] == "<script>alert(1)</script> & <img src=x onerror=alert(2)>"
    assert resp.json["finish_reason"] == "stop" and resp.json["timing"]["ttft_s"] > 0


def test_stream_with_messages_uses_the_chat_template(client, scripted):
    body = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]}
    events = sse_events(client.post("/stream", json=body).data)
    assert "".join(e["text"] for e in events if e["type"] == "delta") == "Hello, world!"
    assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "stop"
    assert scripted.prompts[-1] == "<system>S\n<user>U\n<assistant>"


def test_engine_failure_is_a_500_json_or_an_error_event():
    c = create_app({"TESTING": True}, engine=ScriptedEngine(fail=True)).test_client()
    resp = c.post("/generate", json={"prompt": "x"})
    assert resp.status_code == 500 and "scripted failure" in resp.json["error"]["message"]
    events = sse_events(c.post("/stream", json={"prompt": "x"}).data)
    assert events[-1]["type"] == "error" and "scripted failure" in events[-1]["error"]["message"]


def test_openai_chat_stream_has_the_exact_chunk_sequence(client):
    body = {"model": "whatever", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}}
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.mimetype == "text/event-stream"
    events = sse_events(resp.data)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}]
    contents = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert contents == ["Hello", ",", " world", "!"]
    assert chunks[-2]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert all(c["usage"] is None for c in chunks[:-1])


def test_openai_streams_without_usage_and_completions_shapes(client):
    chat = sse_events(client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 2}).data)
    assert "usage" not in chat[0] and chat[-2]["choices"][0]["finish_reason"] == "length"
    text = sse_events(client.post("/v1/completions", json={"prompt": "hi", "stream": True}).data)
    assert [c["choices"][0]["text"] for c in text[:-2]] == ["Hello", ",", " world", "!"]
    assert text[-2]["choices"][0]["finish_reason"] == "stop" and text[-1] == "[DONE]"
    assert all(c["object"] == "text_completion" for c in text[:-1])
    full = client.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 3}).json
    assert [ch["text"] for ch in full["choices"]] == ["Hello, world"] * 2 and full["usage"]["completion_tokens"] == 6
    msg = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}).json
    assert msg["object"] == "chat.completion" and msg["choices"][0]["message"] == {"role": "assistant",
                                                                                     "content": "Hello, world!"}
    models = client.get("/v1/models").json
    assert models["object"] == "list" and models["data"][0]["id"] == "pagedecode"


def test_errors_are_json_everywhere(client):
    assert client.get("/nope").json["error"]["type"] == "not_found_error"
    wrong = client.put("/generate")
    assert wrong.status_code == 405 and "POST" in wrong.headers["Allow"] and wrong.json["error"]["message"]
    bad = client.post("/v1/chat/completions", data=b"\xc3\x28", content_type="application/json")
    assert bad.status_code == 400 and "UTF-8" in bad.json["error"]["message"]


def test_chat_page_is_served_with_its_assets(client):
    page = client.get("/")
    html = page.data.decode()
    assert page.status_code == 200 and 'type="module"' in html and "js/app.js" in html
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    for asset in ("/static/js/app.js", "/static/js/transport.js", "/static/js/render.js", "/static/css/chat.css"):
        with client.get(asset) as resp:
            assert resp.status_code == 200, asset


def test_no_javascript_builds_html_from_strings():
    sinks = ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function")
    files = sorted((ROOT / "static" / "js").glob("*.js"))
    assert len(files) >= 5
    for path in files:
        source = path.read_text()
        assert not [s for s in sinks if s in source], path.name


# ---- WebSocket (a real threaded server: the test client cannot upgrade) -------------------------
@pytest.fixture
def ws_server():
    servers = []

    def start(engine, **config):
        app = create_app({"TESTING": True, **config}, engine=engine)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"ws://127.0.0.1:{server.server_port}/ws/chat"
    yield start
    for server in servers:
        server.shutdown()


def receive_turn(ws) -> tuple[str, dict]:
    text = ""
    while True:
        event = json.loads(ws.recv())
        if event["type"] == "delta":
            text += event["text"]
        else:
            return text, event


def test_websocket_two_turns_stop_and_errors(ws_server):
    eng = ScriptedEngine(answer=lambda p: [f"turns={p.count('<user>')}", "."] if "long" not in p else ["z"] * 400,
                         delay_s=0.005)
    ws = websocket.create_connection(ws_server(eng), timeout=10)
    history = [{"role": "user", "content": "one"}]
    ws.send(json.dumps({"type": "chat", "messages": history, "params": {"max_tokens": 8}}))
    text, done = receive_turn(ws)
    assert text == "turns=1." and done["type"] == "done" and done["finish_reason"] == "stop"
    history += [{"role": "assistant", "content": text}, {"role": "user", "content": "two"}]
    ws.send(json.dumps({"type": "chat", "messages": history}))
    assert receive_turn(ws)[0] == "turns=2."
    assert "<assistant>turns=1." in eng.prompts[-1]
    ws.send(json.dumps({"type": "chat", "messages": [{"role": "user", "content": "long"}], "params": {"max_tokens": 400}}))
    assert json.loads(ws.recv())["type"] == "delta"
    ws.send(json.dumps({"type": "stop"}))
    text, done = receive_turn(ws)
    assert done["finish_reason"] == "abort" and len(text) < 400
    for frame in ("not json", json.dumps({"type": "dance"}), json.dumps({"type": "chat", "messages": "x"})):
        ws.send(frame)
        assert json.loads(ws.recv())["type"] == "error"
    ws.send(json.dumps({"type": "ping"}))
    assert json.loads(ws.recv()) == {"type": "pong"}
    ws.close()


def test_websocket_closed_mid_answer_aborts_and_frees_every_block(ws_server, tiny):
    ws = websocket.create_connection(ws_server(tiny), timeout=10)
    ws.send(json.dumps({"type": "chat", "messages": [{"role": "user", "content": "x"}]}))
    assert json.loads(ws.recv())["type"] == "error"  # the tiny model has no tokenizer: text needs one
    ws.send(json.dumps({"type": "chat", "prompt": [11] * 30, "params": {"max_tokens": 900, **GREEDY}}))
    assert json.loads(ws.recv())["type"] == "delta"
    assert tiny.stats()["num_running"] == 1
    ws.close()
    assert wait_until(lambda: all_blocks_free(tiny), 1.0), tiny.stats()


def test_websocket_needs_the_api_key_when_set(ws_server, scripted):
    url = ws_server(scripted, API_KEY="k")
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(url, timeout=5)
    assert info.value.status_code == 401
    ws = websocket.create_connection(url + "?api_key=k", timeout=5)
    ws.send(json.dumps({"type": "chat", "messages": [{"role": "user", "content": "x"}]}))
    assert receive_turn(ws)[0] == "Hello, world!"
    ws.close()


# ---- deployment ---------------------------------------------------------------------------------
def test_serve_runs_gunicorn_with_the_config_file_and_the_cli_flags():
    from argparse import Namespace

    from webapp.serve import PagedecodeServer, app_config
    args = Namespace(host="127.0.0.1", port=9, backend="torch", model="/m", threads=2, kv_cache_mb=64.0,
                     config="/c.yaml")
    config = app_config(args)
    assert config == {"ENGINE": {"backend": "torch", "num_threads": 2, "kv_cache_mb": 64.0},
                      "RUNTIME_CONFIG": "/c.yaml", "MODEL_PATH": "/m"}
    server = PagedecodeServer(config, "127.0.0.1:9")
    cfg = server.cfg
    assert cfg.bind == ["127.0.0.1:9"] and cfg.worker_class_str == "gthread" and cfg.workers == 1
    assert cfg.threads >= 32 and not cfg.preload_app and cfg.timeout >= 120
    assert cfg.worker_exit.__name__ == "worker_exit"


def test_unset_max_concurrent_requests_follows_the_engine():
    """max_concurrent_requests unset: twice the engine's max_num_seqs (CPU 32 -> 64 as before, CUDA 128 ->
    256), also when the engine is built in the background; set, it is taken as given."""
    eng = make_tiny_engine(max_num_seqs=3)
    server = create_app({"TESTING": True}, engine=eng).test_client().get("/stats").json["server"]
    assert (server["max_active"], server["max_queued"]) == (6, 256)
    given = create_app({"TESTING": True, "MAX_CONCURRENT_REQUESTS": 5}, engine=eng).test_client()
    assert given.get("/stats").json["server"]["max_active"] == 5
    c = create_app({"TESTING": True, "ENGINE_FACTORY": lambda: (eng, "tiny", None)}).test_client()
    assert wait_until(lambda: c.get("/health").status_code == 200)
    assert c.get("/stats").json["server"]["max_active"] == 6
    assert create_app({"TESTING": True}, engine=ScriptedEngine()).test_client().get("/stats").json["server"][
        "max_active"] == 64                           # an engine that does not say: the old default
    with pytest.raises(ValueError, match="max_concurrent_requests"):
        create_app({"TESTING": True, "MAX_CONCURRENT_REQUESTS": 0}, engine=eng)
