"""GET /: the chat page (templates/chat.html; its JS and CSS live in static/)."""
from __future__ import annotations

from flask import Blueprint, current_app, make_response, render_template

from webapp.edge import runtime

bp = Blueprint("pages", __name__)
# Defence in depth: the page renders model output as text; even so, nothing inline may run.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


@bp.get("/")
def chat():
    """The chat page; it talks to /ws/chat, falling back to /stream."""
    rt = runtime()
    page = {"model": rt.model_name, "defaultMaxTokens": current_app.config["DEFAULT_MAX_TOKENS"],
            "needsApiKey": bool(current_app.config.get("API_KEY"))}
    response = make_response(render_template("chat.html", page=page))
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
