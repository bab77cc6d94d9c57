"""GET /ws/chat: multi-turn chat over a WebSocket (flask-sock).

Client frames: {"type": "chat", "messages": [...], "params": {...}} starts a generation (a
"prompt" instead of "messages" is taken too, as in /stream);
{"type": "stop"} aborts the running one; {"type": "ping"} is answered with {"type": "pong"}.
Server frames: {"type": "delta", ...}* then {"type": "done", ...}, or {"type": "error", ...}.
The same JSON as /stream's events (webapp/schema.py). A closed socket aborts the generation.
With params.beam_width > 1 the turn is a beam search: {"type": "beam_step", ...}* then
{"type": "beam_done", ...}, as /stream_chat_beam sends them (webapp/beam_schema.py).
"""
from __future__ import annotations

import json

from flask import Blueprint, current_app
from flask_sock import Sock

from webapp import beam_schema, schema
from webapp.beam_runtime import beam_events, start_beam
from webapp.edge import check_api_key, defaults, runtime

bp = Blueprint("ws", __name__)
sock = Sock()     # a decorator factory only: routes attach to `bp`, no app state lives here
POLL_S = 0.05     # how often a running generation looks for a stop frame or a closed socket


@bp.before_request
def authorize():
    check_api_key(allow_query=True)  # 401 before the upgrade, as a JSON body


@sock.route("/ws/chat", bp=bp)
def chat(ws):
    """One connection, many turns; each chat frame carries the whole conversation so far."""
    rt = runtime()
    while True:
        frame = _parse_frame(ws.receive())
        if isinstance(frame, schema.ApiError):
            _send(ws, schema.error_event(frame))
        elif frame["type"] == "chat":
            _run_chat(ws, rt, frame)
        elif frame["type"] == "ping":
            _send(ws, {"type": "pong"})
        elif frame["type"] != "stop":  # a stop with nothing running is fine
            _send(ws, schema.error_event(schema.ApiError(
                f"unknown frame type {frame['type']!r}; expected chat, stop or ping", param="type")))


def _parse_frame(raw) -> dict | schema.ApiError:
    try:
        data = schema.load_json(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw)
        if not isinstance(data.get("type"), str):
            raise schema.ApiError("a frame needs a string field type (chat, stop or ping)", param="type")
        return data
    except schema.ApiError as err:
        return err


def _send(ws, event: dict) -> None:
    ws.send(json.dumps(event, ensure_ascii=False, separators=(",", ":")))


def _run_chat(ws, rt, frame: dict) -> None:
    if beam_schema.wants_beam(frame):
        _run_beam(ws, rt, frame)
        return
    try:
        frame = beam_schema.without_beam_width(frame)
        req = schema.parse_generate(frame, max_model_len=rt.engine.max_model_len, defaults=defaults())
        gen = rt.start(req.prompt, req.messages, req.params)
    except schema.ApiError as err:
        _send(ws, schema.error_event(err))
        return
    try:
        for out in gen.outputs(poll_s=POLL_S):
            _check_incoming(ws, gen)
            if out is None:
                continue
            if out.text or out.token_ids:
                _send(ws, schema.delta_event(out))
            if out.finished:
                _send(ws, schema.done_event(out, gen.timing()))
    except schema.ApiError as err:
        _send(ws, schema.error_event(err))
    finally:
        gen.close()  # ConnectionClosed passes through here: the request is aborted


def _run_beam(ws, rt, frame: dict) -> None:
    try:
        spec = beam_schema.parse_beam(frame, max_model_len=rt.engine.max_model_len)
        gen = start_beam(rt, spec)
    except schema.ApiError as err:
        _send(ws, schema.error_event(err))
        return
    try:
        for event in beam_events(gen, current_app.config["BEAM_EXPORT_PATH"], poll_s=POLL_S):
            _check_incoming(ws, gen)
            if event is not None:
                _send(ws, event)
    except schema.ApiError as err:
        _send(ws, schema.error_event(err))
    finally:
        gen.close()


def _check_incoming(ws, gen) -> None:
    """Handle frames that arrive mid-answer: stop aborts; anything else is refused."""
    raw = ws.receive(timeout=0)  # raises ConnectionClosed once the client is gone
    if raw is None:
        return
    frame = _parse_frame(raw)
    if isinstance(frame, schema.ApiError):
        _send(ws, schema.error_event(frame))
    elif frame["type"] == "stop":
        gen.handle.cancel()  # the engine answers with a final output, finish_reason "abort"
    elif frame["type"] == "ping":
        _send(ws, {"type": "pong"})
    else:
        _send(ws, schema.error_event(schema.ApiError("a generation is running; send stop first", status=409,
                                                     param="type")))
