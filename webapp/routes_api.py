"""JSON API: /generate, /generate_batch; operations: /health, /metrics, /stats."""
from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from webapp import beam_schema, schema
from webapp.beam_runtime import run_beam, start_beam
from webapp.edge import defaults, request_json, require_api_key, runtime

bp = Blueprint("api", __name__)


@bp.post("/generate")
@require_api_key
def generate():
    """One prompt or chat in, the whole completion out (beam_width > 1: the beam candidates too)."""
    rt = runtime()
    data = request_json()
    if beam_schema.wants_beam(data):
        return _generate_beam(rt, data)
    data = beam_schema.without_beam_width(data)
    req = schema.parse_generate(data, max_model_len=rt.engine.max_model_len, defaults=defaults())
    gen = rt.start(req.prompt, req.messages, req.params)
    try:
        completion = gen.collect()
    finally:
        gen.close()
    return jsonify(schema.completion_body(gen.request_id, completion, gen.timing()))


def _generate_beam(rt, data: dict):
    spec = beam_schema.parse_beam(data, max_model_len=rt.engine.max_model_len)
    gen = start_beam(rt, spec)
    try:
        out, result = run_beam(gen, current_app.config["BEAM_EXPORT_PATH"])
    finally:
        gen.close()
    return jsonify(beam_schema.beam_body(gen.request_id, out, result, gen.timing()))


@bp.post("/generate_batch")
@require_api_key
def generate_batch():
    """Several prompts run concurrently (continuous batching); results in the order given."""
    rt = runtime()
    reqs = schema.parse_batch(request_json(), max_model_len=rt.engine.max_model_len, defaults=defaults())
    gens = rt.start_many([(r.prompt, r.messages, r.params) for r in reqs])
    try:
        results = [schema.completion_body(g.request_id, g.collect(), g.timing()) for g in gens]
    finally:
        for gen in gens:
            gen.close()
    return jsonify({"results": results})


@bp.get("/health")
def health():
    """200 once the model is loaded; 503 while it loads or if it failed."""
    rt = runtime()
    if rt.state == "ready":
        stats = rt.engine_stats()
        return jsonify({"status": "ok", "model": rt.model_name, "backend": stats.get("backend"),
                        "max_model_len": stats.get("max_model_len")})
    body = {"status": rt.state}
    try:
        rt.engine
    except schema.ApiError as err:
        body.update(err.body())
    return jsonify(body), 503


@bp.get("/metrics")
def metrics():
    """Prometheus text format, from this app's own registry."""
    payload, content_type = runtime().metrics.render()
    return Response(payload, content_type=content_type)


@bp.get("/stats")
def stats():
    """The engine's stats snapshot and the server's admission counts, as JSON."""
    rt = runtime()
    return jsonify({"state": rt.state, "engine": rt.engine_stats(),
                    "server": {"active": rt.admission.num_running, "queued": rt.admission.num_waiting,
                               "max_active": rt.admission.max_running, "max_queued": rt.admission.max_waiting}})
