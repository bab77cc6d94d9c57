"""POST /stream: Server-Sent Events, a `delta` event per update, then `done` (or `error`)."""
from __future__ import annotations

from flask import Blueprint

from webapp import schema
from webapp.edge import defaults, request_json, require_api_key, runtime, sse_response

bp = Blueprint("stream", __name__)
KEEPALIVE_S = 0.5  # a comment this often while quiet: a write is how a gone client is noticed


@bp.post("/stream")
@require_api_key
def stream():
    """Stream one prompt or chat (same body as /generate) as SSE."""
    rt = runtime()
    req = schema.parse_generate(request_json(), max_model_len=rt.engine.max_model_len, defaults=defaults())
    gen = rt.start(req.prompt, req.messages, req.params)
    return sse_response(events(gen), gen.close)


def events(gen):
    """SSE frames for one Generation; leaving early (client gone) aborts the request."""
    try:
        for out in gen.outputs(poll_s=KEEPALIVE_S):
            if out is None:
                yield schema.SSE_KEEPALIVE
                continue
            if out.text or out.token_ids:
                yield schema.sse(schema.delta_event(out))
            if out.finished:
                yield schema.sse(schema.done_event(out, gen.timing()))
    except schema.ApiError as err:
        yield schema.sse(schema.error_event(err))
    finally:
        gen.close()
