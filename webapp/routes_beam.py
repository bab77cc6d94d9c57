"""POST /stream_chat_beam: beam search as SSE (beam_step events, then beam_done); POST /beam_choice:
record which candidate the user preferred in the JSONL export."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from webapp import beam_schema, schema
from webapp.beam_runtime import beam_events, start_beam
from webapp.edge import request_json, require_api_key, runtime, sse_response

bp = Blueprint("beam", __name__)
KEEPALIVE_S = 0.5  # a comment this often while quiet: a write is how a gone client is noticed


@bp.post("/stream_chat_beam")
@require_api_key
def stream_chat_beam():
    """Beam search over one prompt or chat; the tree streams step by step, the reranked candidates last."""
    rt = runtime()
    spec = beam_schema.parse_beam(request_json(), max_model_len=rt.engine.max_model_len)
    gen = start_beam(rt, spec)
    return sse_response(events(gen, current_app.config["BEAM_EXPORT_PATH"]), gen.close)


def events(gen, export_path):
    """SSE frames for one beam search; leaving early (client gone) aborts it and frees its blocks."""
    try:
        for event in beam_events(gen, export_path, poll_s=KEEPALIVE_S):
            yield schema.SSE_KEEPALIVE if event is None else schema.sse(event)
    except schema.ApiError as err:
        yield schema.sse(schema.error_event(err))
    finally:
        gen.close()


@bp.post("/beam_choice")
@require_api_key
def beam_choice():
    """Set `chosen` (an index into the candidates as beam_done sent them) of one exported record."""
    from engine.rerank_data import record_choice
    record_id, chosen = beam_schema.parse_choice(request_json())
    path = current_app.config["BEAM_EXPORT_PATH"]
    try:
        record = record_choice(path, record_id, chosen)
    except (KeyError, FileNotFoundError):
        raise schema.ApiError(f"no beam search record with id {record_id!r}", status=404, type="not_found_error",
                              param="record_id") from None
    except ValueError as exc:
        raise schema.ApiError(str(exc), param="chosen") from None
    candidate = record["candidates"][chosen] if chosen is not None else None
    return jsonify({"record_id": record_id, "chosen": chosen, "candidate": candidate})
