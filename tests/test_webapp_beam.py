"""Beam search through the web app: /stream_chat_beam (SSE), /generate with beam_width, the
WebSocket, /beam_choice and the JSONL export. The tiny-model Engine (token-id prompts) drives the
real scheduler and block manager; a scripted beam engine (engine.beam.BeamSearch over seeded fake
logprobs, words as tokens, a delay per step) gives text and timing; the last test runs SmolLM2 under
a real gunicorn."""
from __future__ import annotations

import json
import threading
import zlib

import httpx
import pytest
import torch
import websocket

from engine.beam import FINISHED, KEPT, PRUNED, BeamParams, BeamSearch
from engine.request import RequestHandle, RequestOutput
from tests.conftest import make_tiny_engine, run_to_completion
from tests.test_webapp import ScriptedEngine, all_blocks_free, sse_events, wait_until, ws_server  # noqa: F401
from webapp import create_app

WORDS = ["</s>", " the", " sea", " is", " blue", " and", " calm", " at", " night", " waves", " roll", " over",
         " sand", " stars", " shine", " softly", " a", " boat", " drifts", " home", " light", " wind", " sings",
         " quiet", " deep", " green", " gulls", " cry", " far", " away", " morning", " tide"]
TINY_PROMPT = [5, 9, 33, 4, 17, 100]


# ---- a scripted beam engine -----------------------------------------------------------------------
def fake_logprobs(prompt: list[int], history: list[int], eos_slope: float = 0.45) -> torch.Tensor:
    """Seeded by the prompt and the beam's history; end-of-sequence grows likelier with length."""
    g = torch.Generator().manual_seed(zlib.crc32(json.dumps([prompt[-16:], history]).encode()))
    logits = torch.randn(len(WORDS), generator=g) * 1.5
    logits[0] = -4.0 + eos_slope * len(history)
    return logits.log_softmax(-1)


def candidate_text(token_ids: list[int]) -> str:
    return "".join(WORDS[t] for t in token_ids if t != 0).strip()


class ScriptedBeamEngine(ScriptedEngine):
    """ScriptedEngine plus submit_beam: the real BeamSearch bookkeeping over fake_logprobs, one step
    per delay_s on its own thread, publishing outputs shaped as engine/beam_request.py makes them."""

    eos_slope = 0.45

    def submit_beam(self, prompt, params: BeamParams, *, messages=None, request_id=None) -> RequestHandle:
        return self._start(self._run_beam, "beam", prompt, params, request_id)

    def _run_beam(self, rid, handle, prompt, params, stop) -> None:
        search = BeamSearch(params, (0,), lambda t: WORDS[t])
        while not stop.wait(self.delay_s):
            step = search.step(torch.stack([fake_logprobs(prompt, h, self.eos_slope) for h in search.histories]))
            if step.done:
                break
            handle.put(RequestOutput(rid, "", [], num_prompt_tokens=len(prompt),
                                     num_generated_tokens=search.num_generated,
                                     beam_nodes=[n.as_dict() for n in step.new_nodes],
                                     beam_dropped=step.dropped_nodes))
        cands = [{"text": candidate_text(h.token_ids), "token_ids": h.token_ids, "score": h.score,
                  "lm_score": h.score, "logprob_sum": h.logprob_sum, "num_tokens": len(h.token_ids),
                  "node_id": h.node_id} for h in search.results()]
        with self._lock:
            del self._running[rid]
            if stop.is_set():
                self.aborted.append(rid)
        best = cands[0] if cands else {"text": "", "token_ids": []}
        handle.put(RequestOutput(rid, best["text"], list(best["token_ids"]), True,
                                 "abort" if stop.is_set() else "stop", len(prompt), search.num_generated,
                                 beams=cands, beam_tree=[n.as_dict() for n in search.nodes], peak_blocks=0))


# ---- fixtures and helpers -------------------------------------------------------------------------
@pytest.fixture
def export(tmp_path):
    return tmp_path / "beam_choices.jsonl"


@pytest.fixture
def tiny():
    eng = make_tiny_engine().start()
    yield eng
    eng.stop()


@pytest.fixture
def tiny_client(tiny, export):
    return create_app({"TESTING": True, "BEAM_EXPORT_PATH": str(export)}, engine=tiny).test_client()


@pytest.fixture
def scripted_beam():
    return ScriptedBeamEngine(delay_s=0.002)


@pytest.fixture
def client(scripted_beam, export):
    return create_app({"TESTING": True, "BEAM_EXPORT_PATH": str(export)}, engine=scripted_beam).test_client()


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_tree(steps: list[dict], done: dict) -> dict:
    """The streamed steps and the final tree agree and form one tree; returns the tree by id."""
    tree = {n["id"]: n for n in done["tree"]}
    assert tree[0]["parent"] is None and tree[0]["step"] == 0
    streamed = [n for ev in steps for n in ev["nodes"]]
    assert len({n["id"] for n in streamed}) == len(streamed)
    for node in streamed:   # a node streams once; only a finished node may later be pruned (bumped out)
        final = tree[node["id"]]
        assert {k: v for k, v in final.items() if k != "status"} == {k: v for k, v in node.items() if k != "status"}
        assert final["status"] == node["status"] or (node["status"], final["status"]) == (FINISHED, PRUNED)
    for node in list(tree.values())[1:]:
        parent = tree[node["parent"]]
        assert node["status"] in (KEPT, PRUNED, FINISHED) and node["step"] == parent["step"] + 1
        assert parent["status"] == KEPT, "only kept nodes grow children"
    for i, ev in enumerate(steps):
        assert {n["step"] for n in ev["nodes"]} == {i + 1}
        assert all(tree[d]["status"] == KEPT and tree[d]["step"] == i for d in ev["dropped"])
    for cand in done["candidates"]:   # a candidate is the path from the root to its finished node
        node, path = tree[cand["node_id"]], []
        assert node["status"] == FINISHED
        while node["parent"] is not None:
            path.append(node["token_id"])
            node = tree[node["parent"]]
        assert path[::-1] == cand["token_ids"]
    return tree


# ---- SSE on the tiny engine: the real scheduler and block manager ---------------------------------
def test_stream_chat_beam_streams_the_tree_then_the_candidates(tiny, tiny_client, export):
    body = {"prompt": TINY_PROMPT, "beam_width": 4, "max_tokens": 10, "rerank": False}
    resp = tiny_client.post("/stream_chat_beam", json=body)
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"
    events = sse_events(resp.data)
    steps, done = events[:-1], events[-1]
    assert [e["type"] for e in steps] == ["beam_step"] * len(steps) and done["type"] == "beam_done"
    assert 1 <= len(steps) <= 9 and all(set(e) == {"type", "nodes", "dropped"} for e in steps)
    assert all(len(e["nodes"]) == 8 for e in steps)   # 2W candidates a step
    assert set(done) == {"type", "finish_reason", "candidates", "record_id", "reranked", "tree", "usage",
                         "peak_blocks", "timing"}
    check_tree(steps, done)
    eng = make_tiny_engine()
    alone = run_to_completion(eng, [eng.submit_beam(TINY_PROMPT, BeamParams(beam_width=4, max_tokens=10))])[0]
    assert [c["token_ids"] for c in done["candidates"]] == [b["token_ids"] for b in alone.beams]
    assert [c["index"] for c in done["candidates"]] == list(range(4)) and done["reranked"] is False
    assert done["usage"]["prompt_tokens"] == len(TINY_PROMPT) and done["peak_blocks"] >= 1
    assert done["finish_reason"] == "stop" and done["timing"]["ttft_s"] > 0
    [rec] = records(export)
    assert rec["id"] == done["record_id"] and rec["chosen"] is None and rec["prompt"] == "5 9 33 4 17 100"
    assert [c["token_ids"] for c in rec["candidates"]] == [c["token_ids"] for c in done["candidates"]]
    assert wait_until(lambda: all_blocks_free(tiny), 1.0), tiny.stats()


def test_closing_a_beam_stream_mid_search_aborts_and_frees_every_block(tiny, tiny_client, export):
    body = {"prompt": [7] * 40, "beam_width": 4, "max_tokens": 600, "early_stopping": "never", "rerank": False}
    resp = tiny_client.post("/stream_chat_beam", json=body, buffered=False)
    chunks = resp.response if hasattr(resp, "response") else iter(resp.iter_encoded())
    got = [json.loads(next(chunks)[6:]) for _ in range(3)]
    assert [e["type"] for e in got] == ["beam_step"] * 3
    assert tiny.stats()["num_running"] == 4 and tiny.stats()["num_used_blocks"] > 0
    resp.close()  # what a WSGI server does when the client goes away
    assert wait_until(lambda: all_blocks_free(tiny), 2.0), tiny.stats()
    assert tiny_client.get("/stats").json["server"]["active"] == 0
    assert not export.exists()  # an aborted search is not exported


def test_generate_takes_a_beam_width(tiny, tiny_client, export):
    beam = tiny_client.post("/generate", json={"prompt": TINY_PROMPT, "beam_width": 3, "max_tokens": 6,
                                               "rerank": False})
    assert beam.status_code == 200
    body = beam.json
    assert len(body["candidates"]) == 3 and body["token_ids"] == body["candidates"][0]["token_ids"]
    assert body["record_id"] == records(export)[0]["id"] and body["usage"]["completion_tokens"] >= 1
    assert all(c["features"] == {} and c["rerank_score"] is None for c in body["candidates"])
    plain = tiny_client.post("/generate", json={"prompt": TINY_PROMPT, "beam_width": 1, "max_tokens": 6,
                                                "temperature": 0})
    assert plain.status_code == 200 and "candidates" not in plain.json and len(plain.json["token_ids"]) == 6
    assert len(records(export)) == 1


# ---- text, reranking, choices (scripted beam engine) ---------------------------------------------
def test_candidates_come_reranked_and_the_record_holds_them(client, export):
    chat = [{"role": "user", "content": "Tell me about the sea at night."}]
    events = sse_events(client.post("/stream_chat_beam", json={"messages": chat, "beam_width": 4,
                                                                "max_tokens": 16}).data)
    done = events[-1]
    tree = check_tree(events[:-1], done)
    assert done["reranked"] is True and len(done["candidates"]) == 4
    scores = [c["rerank_score"] for c in done["candidates"]]
    assert scores == sorted(scores, reverse=True)
    assert sorted(c["index"] for c in done["candidates"]) == [0, 1, 2, 3]
    for cand in done["candidates"]:
        assert set(cand["features"]) == {"lm_logprob", "relevance", "repetition", "log_length"}
        assert cand["text"] == candidate_text(cand["token_ids"]) and cand["text"]
        assert tree[cand["node_id"]]["text"] == WORDS[cand["token_ids"][-1]]
    [rec] = records(export)
    assert rec["prompt"] == chat[0]["content"] and rec["id"] == done["record_id"]
    assert [c["text"] for c in rec["candidates"]] == [c["text"] for c in done["candidates"]]
    assert [c["rerank_score"] for c in rec["candidates"]] == pytest.approx(scores)


def test_beam_choice_records_the_pick_in_the_jsonl(client, export):
    done = sse_events(client.post("/stream_chat_beam", json={"prompt": "the sea", "beam_width": 3,
                                                              "rerank": False}).data)[-1]
    sse_events(client.post("/stream_chat_beam", json={"prompt": "the sand", "beam_width": 2,
                                                      "rerank": False}).data)
    resp = client.post("/beam_choice", json={"record_id": done["record_id"], "chosen": 2})
    assert resp.status_code == 200
    assert resp.json == {"record_id": done["record_id"], "chosen": 2,
                         "candidate": {**records(export)[0]["candidates"][2]}}
    first, second = records(export)
    assert first["id"] == done["record_id"] and first["chosen"] == 2 and second["chosen"] is None
    assert client.post("/beam_choice", json={"record_id": done["record_id"], "chosen": 0}).status_code == 200
    assert records(export)[0]["chosen"] == 0   # a second pick replaces the first
    bad = [({"record_id": "f" * 32, "chosen": 0}, 404, "record_id"),
           ({"record_id": done["record_id"], "chosen": 3}, 400, "chosen"),
           ({"record_id": done["record_id"], "chosen": -1}, 400, "chosen"),
           ({"record_id": done["record_id"], "chosen": "1"}, 400, "chosen"),
           ({"record_id": done["record_id"]}, 400, "chosen"),
           ({"record_id": 7, "chosen": 0}, 400, "record_id"),
           ({"record_id": "x" * 65, "chosen": 0}, 400, "record_id"),
           ({"record_id": done["record_id"], "chosen": 0, "extra": 1}, 400, "extra")]
    for body, status, param in bad:
        resp = client.post("/beam_choice", json=body)
        assert resp.status_code == status and resp.json["error"]["param"] == param, (body, resp.json)
    assert records(export)[0]["chosen"] == 0


def test_beam_choice_before_any_export_is_a_404(scripted_beam, tmp_path):
    c = create_app({"TESTING": True, "BEAM_EXPORT_PATH": str(tmp_path / "none.jsonl")}, engine=scripted_beam)
    resp = c.test_client().post("/beam_choice", json={"record_id": "abc", "chosen": 0})
    assert resp.status_code == 404 and resp.json["error"]["type"] == "not_found_error"


def test_a_failing_reranker_leaves_lm_order_and_still_exports(scripted_beam, export):
    def broken():
        raise FileNotFoundError("no MiniLM here")
    c = create_app({"TESTING": True, "BEAM_EXPORT_PATH": str(export), "RERANKER_FACTORY": broken},
                   engine=scripted_beam).test_client()
    done = sse_events(c.post("/stream_chat_beam", json={"prompt": "the sea", "beam_width": 3}).data)[-1]
    assert done["reranked"] is False and [c["index"] for c in done["candidates"]] == [0, 1, 2]
    lm = [c["lm_score"] for c in done["candidates"]]
    assert lm == sorted(lm, reverse=True) and records(export)[0]["id"] == done["record_id"]


BAD_BEAM = [({"beam_width": 0}, "beam_width"), ({"beam_width": 17}, "beam_width"),
            ({"beam_width": "4"}, "beam_width"), ({"beam_width": True}, "beam_width"),
            ({"beam_width": 4, "max_tokens": 0}, "max_tokens"), ({"beam_width": 4, "max_tokens": 10_000}, "max_tokens"),
            ({"beam_width": 4, "length_penalty": "long"}, "length_penalty"),
            ({"beam_width": 4, "early_stopping": "sometimes"}, "early_stopping"),
            ({"beam_width": 4, "num_return": 5}, "num_return"), ({"beam_width": 4, "rerank": "yes"}, "rerank"),
            ({"beam_width": 4, "temperature": 0.7}, "temperature"), ({"beam_width": 4, "beams": 2}, "beams"),
            ({"beam_width": 4, "params": [1]}, "params")]


@pytest.mark.parametrize("fields,param", BAD_BEAM)
def test_bad_beam_params_are_a_400_naming_the_field(client, fields, param, export):
    for path in ("/stream_chat_beam", "/generate"):
        resp = client.post(path, json={"prompt": "the sea", **fields})
        assert resp.status_code == 400 and resp.is_json, (path, fields)
        assert resp.json["error"]["param"] == param and resp.json["error"]["type"] == "invalid_request_error"
    assert not export.exists()


def test_beam_prompt_errors_limits_and_api_key(scripted_beam, export):
    c = create_app({"TESTING": True, "API_KEY": "k", "MAX_PROMPT_TOKENS": 20, "BEAM_EXPORT_PATH": str(export)},
                   engine=scripted_beam).test_client()
    auth = {"Authorization": "Bearer k"}
    for path, body in (("/stream_chat_beam", {"prompt": "x"}), ("/beam_choice", {"record_id": "a", "chosen": 0}),
                       ("/generate", {"prompt": "x", "beam_width": 2})):
        assert c.post(path, json=body).status_code == 401, path
    both = c.post("/stream_chat_beam", json={"prompt": "x", "messages": [{"role": "user", "content": "y"}]},
                  headers=auth)
    assert both.status_code == 400 and both.json["error"]["param"] == "messages"
    long = c.post("/stream_chat_beam", json={"prompt": "x" * 30}, headers=auth)
    assert long.status_code == 400 and "max_prompt_tokens 20" in long.json["error"]["message"]
    assert c.post("/stream_chat_beam", data=b"[1]", content_type="application/json", headers=auth).status_code == 400


def test_beam_searches_count_against_max_concurrent_requests(export):
    eng = ScriptedBeamEngine(delay_s=0.02)
    c = create_app({"TESTING": True, "MAX_CONCURRENT_REQUESTS": 1, "MAX_QUEUE_LENGTH": 0,
                    "BEAM_EXPORT_PATH": str(export)}, engine=eng).test_client()
    first = c.post("/stream_chat_beam", json={"prompt": "a", "beam_width": 2, "max_tokens": 200,
                                              "early_stopping": "never", "rerank": False}, buffered=False)
    busy = c.post("/stream_chat_beam", json={"prompt": "b", "beam_width": 2})
    assert busy.status_code == 429 and busy.json["error"]["type"] == "rate_limit_error"
    assert c.post("/generate", json={"prompt": "b", "beam_width": 2}).status_code == 429
    first.close()
    assert wait_until(lambda: c.get("/stats").json["server"]["active"] == 0)
    assert wait_until(lambda: len(eng.aborted) == 1)


def test_chat_page_has_the_beam_settings_and_module(client):
    html = client.get("/").data.decode()
    for name in ("beam_width", "beam_max_tokens", "length_penalty", "early_stopping", "rerank"):
        assert f'name="{name}"' in html, name
    for module, needle in (("beam.js", 'from "./beam_tree.js"'), ("beam_tree.js", "createElementNS")):
        with client.get(f"/static/js/{module}") as resp:
            assert resp.status_code == 200 and needle in resp.data.decode(), module
    with client.get("/static/js/app.js") as resp:
        app_js = resp.data.decode()
    assert 'from "./beam.js"' in app_js and "/beam_choice" in app_js


def test_export_path_from_the_runtime_config_is_taken_from_the_repository_root(tmp_path, scripted_beam,
                                                                               monkeypatch):
    from webapp import ROOT
    path = tmp_path / "runtime.yaml"
    path.write_text("server:\n  beam_export_path: somewhere/b.jsonl\n")
    monkeypatch.setenv("PAGEDECODE_CONFIG", str(path))
    assert create_app({"TESTING": True}, engine=scripted_beam).config["BEAM_EXPORT_PATH"] == ROOT / "somewhere/b.jsonl"
    path.write_text(f"server:\n  beam_export_path: {tmp_path / 'abs.jsonl'}\n")
    assert create_app({"TESTING": True}, engine=scripted_beam).config["BEAM_EXPORT_PATH"] == tmp_path / "abs.jsonl"
    path.write_text("server:\n  beam_export_path: 3\n")
    with pytest.raises(ValueError, match="beam_export_path"):
        create_app({"TESTING": True}, engine=scripted_beam)
    monkeypatch.delenv("PAGEDECODE_CONFIG")
    assert create_app({"TESTING": True}, engine=scripted_beam).config["BEAM_EXPORT_PATH"] == \
        ROOT / "artifacts" / "beam_choices.jsonl"


# ---- WebSocket --------------------------------------------------------------------------------------
def receive_beam(ws) -> tuple[list[dict], dict]:
    steps = []
    while True:
        event = json.loads(ws.recv())
        if event["type"] != "beam_step":
            return steps, event
        steps.append(event)


def test_websocket_beam_turn_stop_and_a_plain_turn(ws_server, export):
    eng = ScriptedBeamEngine(delay_s=0.01)
    ws = websocket.create_connection(ws_server(eng, BEAM_EXPORT_PATH=str(export)), timeout=10)
    chat = [{"role": "user", "content": "Sing about the tide."}]
    ws.send(json.dumps({"type": "chat", "messages": chat, "params": {"beam_width": 3, "max_tokens": 12,
                                                                       "rerank": False}}))
    steps, done = receive_beam(ws)
    assert done["type"] == "beam_done" and len(steps) >= 2 and done["finish_reason"] == "stop"
    check_tree(steps, done)
    assert records(export)[0]["id"] == done["record_id"]
    ws.send(json.dumps({"type": "chat", "messages": chat, "params": {"beam_width": 4, "max_tokens": 300,
                                                                       "early_stopping": "never", "rerank": False}}))
    assert json.loads(ws.recv())["type"] == "beam_step"
    ws.send(json.dumps({"type": "stop"}))
    steps, done = receive_beam(ws)
    assert done["type"] == "beam_done" and done["finish_reason"] == "abort" and done["record_id"] is None
    assert len(steps) < 100 and wait_until(lambda: len(eng.aborted) == 1)
    ws.send(json.dumps({"type": "chat", "messages": chat, "params": {"beam_width": 0}}))
    err = json.loads(ws.recv())
    assert err["type"] == "error" and err["error"]["param"] == "beam_width"
    ws.send(json.dumps({"type": "chat", "messages": chat, "params": {"beam_width": 1, "max_tokens": 8}}))
    assert [json.loads(ws.recv())["type"] for _ in range(5)] == ["delta"] * 4 + ["done"]
    assert len(records(export)) == 1
    ws.close()


def test_websocket_closed_mid_beam_frees_every_block(ws_server, tiny, export):
    ws = websocket.create_connection(ws_server(tiny, BEAM_EXPORT_PATH=str(export)), timeout=10)
    ws.send(json.dumps({"type": "chat", "prompt": [11] * 30,
                        "params": {"beam_width": 4, "max_tokens": 600, "early_stopping": "never", "rerank": False}}))
    assert [json.loads(ws.recv())["type"] for _ in range(2)] == ["beam_step"] * 2
    assert tiny.stats()["num_running"] == 4
    ws.close()
    assert wait_until(lambda: all_blocks_free(tiny), 2.0), tiny.stats()


# ---- the real model under gunicorn ------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    """gunicorn serving SmolLM2 with its export file in tmp (the session server writes to the default)."""
    from tests.test_server_clients import API_KEY, run_gunicorn
    tmp = tmp_path_factory.mktemp("beam_server")
    config = tmp / "runtime.yaml"
    config.write_text(json.dumps({
        "model": {"path": None},
        "engine": {"backend": "auto", "block_size": 16, "kv_cache_mb": 64, "max_num_seqs": 16,
                   "max_batched_tokens": 512, "max_model_len": 2048},
        "server": {"api_key": API_KEY, "beam_export_path": str(tmp / "beam.jsonl")}}))
    with run_gunicorn(tmp, config) as base:
        yield base, tmp / "beam.jsonl", {"Authorization": f"Bearer {API_KEY}"}


@pytest.mark.slow
def test_real_model_beam_over_sse_then_a_choice(real_server):
    from httpx_sse import connect_sse
    base, export, auth = real_server
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    with httpx.Client(timeout=120, headers=auth) as http:
        with connect_sse(http, "POST", base + "/stream_chat_beam",
                         json={"messages": chat, "beam_width": 4, "max_tokens": 16}) as source:
            events = [json.loads(e.data) for e in source.iter_sse()]
        done = events[-1]
        tree = check_tree(events[:-1], done)
        assert done["type"] == "beam_done" and done["reranked"] is True and len(done["candidates"]) == 4
        assert any("Paris" in c["text"] for c in done["candidates"]), [c["text"] for c in done["candidates"]]
        assert any(n["text"].strip() == "Paris" for n in tree.values())
        resp = http.post(base + "/beam_choice", json={"record_id": done["record_id"], "chosen": 1})
        assert resp.status_code == 200
        [rec] = records(export)
        assert rec["chosen"] == 1 and rec["prompt"] == chat[0]["content"]
        assert rec["candidates"][1]["text"] == done["candidates"][1]["text"]
        stats = http.get(base + "/stats").json()["engine"]
        assert stats["num_running"] == 0 and stats["num_used_blocks"] == 0
