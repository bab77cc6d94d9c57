"""The Flask app factory: settings from config/runtime_config.yaml, one Runtime (the Engine, built
on a background thread unless given), one blueprint per routes_*.py, JSON errors everywhere."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from engine.config import CONFIG_DIR, load_file, load_runtime_config
from webapp.edge import drain_unread_body
from webapp.runtime import Limits, Runtime
from webapp.schema import ApiError, error_body

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("pagedecode.webapp")
DEFAULT_BEAM_EXPORT_PATH = "artifacts/beam_choices.jsonl"  # every beam search appends its record here

_SERVER_KEYS = {"max_concurrent_requests": "MAX_CONCURRENT_REQUESTS", "max_queue_length": "MAX_QUEUE_LENGTH",
                "max_body_bytes": "MAX_CONTENT_LENGTH", "max_prompt_tokens": "MAX_PROMPT_TOKENS",
                "api_key": "API_KEY", "default_max_tokens": "DEFAULT_MAX_TOKENS",
                "beam_export_path": "BEAM_EXPORT_PATH"}
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                429: "rate_limit_error"}


def create_app(test_config: dict | None = None, engine=None) -> Flask:
    """Build the app. `engine` (tests) is used as is; otherwise ENGINE_FACTORY, or the Decoder
    over MODEL_PATH, builds one on a background thread while /health answers 503."""
    test_config = dict(test_config or {})
    app = Flask(__name__, template_folder=str(ROOT / "templates"), static_folder=str(ROOT / "static"))
    app.config.update(_settings(test_config))
    app.json.sort_keys = False  # keep OpenAI's field order: id, object, created, model, choices
    runtime = Runtime(_limits(app.config), engine=engine, model_name=app.config["MODEL_NAME"],
                      reranker_factory=app.config.get("RERANKER_FACTORY"))
    app.extensions["pagedecode"] = runtime
    if engine is None:
        runtime.load_in_background(app.config.get("ENGINE_FACTORY") or _decoder_factory(app.config))

    from webapp import routes_api, routes_beam, routes_openai, routes_pages, routes_stream, routes_ws
    for module in (routes_pages, routes_api, routes_stream, routes_beam, routes_ws, routes_openai):
        app.register_blueprint(module.bp)
    _register_errors(app)
    return app


def _settings(test_config: dict) -> dict:
    """Defaults < runtime config file (PAGEDECODE_CONFIG picks it) < PAGEDECODE_API_KEY < test_config."""
    path = test_config.get("RUNTIME_CONFIG") or os.environ.get("PAGEDECODE_CONFIG") or None
    runtime_config = load_runtime_config(path)
    server = runtime_config.get("server") or {}
    unknown = sorted(set(server) - set(_SERVER_KEYS))
    if unknown:
        raise ValueError(f"runtime config: unknown server key(s) {unknown}; known: {sorted(_SERVER_KEYS)}")
    settings = {"MAX_CONCURRENT_REQUESTS": None, "MAX_QUEUE_LENGTH": 256, "MAX_CONTENT_LENGTH": 1 << 20,
                "MAX_PROMPT_TOKENS": 4096, "API_KEY": None, "DEFAULT_MAX_TOKENS": 256, "MODEL_NAME": None,
                "BEAM_EXPORT_PATH": DEFAULT_BEAM_EXPORT_PATH,
                "RUNTIME_CONFIG": path,
                "ENGINE": dict(runtime_config.get("engine") or {}),
                "MODEL_PATH": (runtime_config.get("model") or {}).get("path")}
    settings.update({_SERVER_KEYS[k]: v for k, v in server.items()})
    if os.environ.get("PAGEDECODE_API_KEY"):
        settings["API_KEY"] = os.environ["PAGEDECODE_API_KEY"]
    settings["ENGINE"].update(test_config.pop("ENGINE", None) or {})
    settings.update(test_config)
    for key in ("MAX_CONCURRENT_REQUESTS", "MAX_CONTENT_LENGTH", "MAX_PROMPT_TOKENS", "DEFAULT_MAX_TOKENS"):
        if key == "MAX_CONCURRENT_REQUESTS" and settings[key] is None:      # twice the engine's max_num_seqs
            continue
        if not isinstance(settings[key], int) or isinstance(settings[key], bool) or settings[key] <= 0:
            raise ValueError(f"server config: {key.lower()} must be a positive integer, got {settings[key]!r}")
    if not isinstance(settings["MAX_QUEUE_LENGTH"], int) or settings["MAX_QUEUE_LENGTH"] < 0:
        raise ValueError(f"server config: max_queue_length must be an integer >= 0, "
                         f"got {settings['MAX_QUEUE_LENGTH']!r}")
    if settings["API_KEY"] is not None and not (isinstance(settings["API_KEY"], str) and settings["API_KEY"]):
        raise ValueError("server config: api_key must be a non-empty string or null")
    export = settings["BEAM_EXPORT_PATH"]
    if not isinstance(export, (str, os.PathLike)) or not str(export):
        raise ValueError(f"server config: beam_export_path must be a file path, got {export!r}")
    settings["BEAM_EXPORT_PATH"] = ROOT / export  # a relative path is taken from the repository root
    settings["SOCK_SERVER_OPTIONS"] = {"ping_interval": 25, "max_message_size": settings["MAX_CONTENT_LENGTH"]}
    return settings


def _limits(config) -> Limits:
    return Limits(config["MAX_CONCURRENT_REQUESTS"], config["MAX_QUEUE_LENGTH"], config["MAX_PROMPT_TOKENS"])


def _decoder_factory(config):
    """Build the Decoder (embedded SmolLM2 unless MODEL_PATH) with ENGINE options; backend 'auto'."""
    engine_options = dict(config["ENGINE"])
    model_path = config["MODEL_PATH"]

    def build():
        from engine.config import EngineConfig
        from engine.decoder import Decoder
        overrides_file = CONFIG_DIR / "model_config.yaml"
        overrides = load_file(overrides_file) if overrides_file.exists() else {}
        decoder = Decoder(model_path, EngineConfig.from_dict(engine_options), model_overrides=overrides or None)
        return decoder.engine, decoder.model_name, decoder.close
    return build


def _register_errors(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(err: ApiError):
        return jsonify(err.body()), err.status

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException):
        type_ = _ERROR_TYPES.get(err.code, "invalid_request_error" if err.code < 500 else "server_error")
        message = err.description or err.name
        if err.code == 413:
            message = f"request body too large: at most {app.config['MAX_CONTENT_LENGTH']} bytes"
        response = jsonify(error_body(message, type_))
        if err.code == 405 and err.valid_methods:
            response.headers["Allow"] = ", ".join(err.valid_methods)
        return response, err.code

    @app.errorhandler(Exception)
    def server_error(err: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify(error_body(f"internal error: {type(err).__name__}", "server_error")), 500

    @app.after_request
    def count_response(response):
        if response.status_code >= 400:
            drain_unread_body()
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        app.extensions["pagedecode"].metrics.responses.labels(rule, str(response.status_code)).inc()
        return response
