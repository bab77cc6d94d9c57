"""HTTP edge helpers shared by the blueprints: the app's Runtime, the JSON body, the API key."""
from __future__ import annotations

import functools
import hmac

from flask import Response, current_app, g, request
from werkzeug.wsgi import LimitedStream

from webapp.runtime import Runtime
from webapp.schema import ApiError, load_json

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MAX_DRAIN_BYTES = 16 << 20


def runtime() -> Runtime:
    return current_app.extensions["pagedecode"]


def request_json() -> dict:
    """The body as a JSON object (400 otherwise; 413 past MAX_CONTENT_LENGTH, raised by Werkzeug)."""
    raw = request.get_data(cache=False)
    g.body_read = True
    return load_json(raw)


def drain_unread_body() -> None:
    """Read and drop the body of a request refused before reading it (413, 401, 429, 503).

    gunicorn drains at most 64 KiB of an unread body itself; past that it closes the connection
    after a response that announced keep-alive, and the client's next request on it fails.
    """
    length = request.content_length
    if g.get("body_read") or not length or length > MAX_DRAIN_BYTES:
        return
    stream = LimitedStream(request.environ["wsgi.input"], length)
    while stream.read(1 << 16):
        pass
    g.body_read = True


def defaults(**overrides) -> dict:
    """Sampling defaults applied before the request's own fields."""
    return {"max_tokens": current_app.config["DEFAULT_MAX_TOKENS"], **overrides}


def check_api_key(allow_query: bool = False) -> None:
    """401 unless the request carries the configured key (Authorization: Bearer <key>). Browsers
    cannot set headers on a WebSocket, so that route may pass it as ?api_key= instead."""
    key = current_app.config.get("API_KEY")
    if not key:
        return
    header = request.headers.get("Authorization", "")
    given = header[7:].strip() if header[:7].lower() == "bearer " else None
    if given is None and allow_query:
        given = request.args.get("api_key")
    if given is None:
        raise ApiError("missing API key: send the header Authorization: Bearer <key>", status=401,
                       type="authentication_error")
    if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), key.encode("utf-8")):
        raise ApiError("invalid API key", status=401, type="authentication_error")


def require_api_key(view):
    """Decorator for every route that generates."""
    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        check_api_key()
        return view(*args, **kwargs)
    return wrapped


def sse_response(events, on_close) -> Response:
    """A text/event-stream response; on_close runs when the server closes it, even if the
    generator never started (a client gone before the first byte)."""
    response = Response(events, mimetype="text/event-stream", headers=SSE_HEADERS)
    response.call_on_close(on_close)
    return response
