"""GET /: the chat page (templates/chat.html; its JS and CSS live in static/)."""
from __future__ import annotations

from flask import Blueprint, current_app, render_template

from webapp.edge import runtime

bp = Blueprint("pages", __name__)


@bp.get("/")
def chat():
    """The chat page; it talks to /ws/chat, falling back to /stream."""
    rt = runtime()
    page = {"model": rt.model_name, "defaultMaxTokens": current_app.config["DEFAULT_MAX_TOKENS"],
            "needsApiKey": bool(current_app.config.get("API_KEY"))}
    return render_template("chat.html", page=page)
