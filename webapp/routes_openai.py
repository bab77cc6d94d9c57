"""OpenAI-compatible API: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

Streams use OpenAI's exact chunk shapes: (chat) a first delta with the role, content deltas, a
final chunk with finish_reason, a usage chunk (choices: []) when stream_options.include_usage,
then `data: [DONE]`.
"""
from __future__ import annotations

import time
import uuid

from flask import Blueprint, jsonify

from webapp import schema
from webapp.edge import defaults, request_json, require_api_key, runtime, sse_response
from webapp.routes_stream import KEEPALIVE_S

bp = Blueprint("openai", __name__, url_prefix="/v1")
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions


@bp.get("/models")
def models():
    """The one model this process serves."""
    rt = runtime()
    engine = rt.engine  # 503 while loading
    return jsonify({"object": "list", "data": [{
        "id": rt.model_name, "object": "model", "created": rt.created, "owned_by": "pagedecode",
        "max_model_len": engine.max_model_len}]})


@bp.post("/chat/completions")
@require_api_key
def chat_completions():
    rt = runtime()
    req = schema.parse_openai_chat(request_json(), max_model_len=rt.engine.max_model_len, defaults=defaults())
    gen = rt.start(None, req.messages, req.params)
    shape = _Shape("chat", rt, req)
    if req.stream:
        return sse_response(_stream(gen, shape, req.include_usage), gen.close)
    try:
        done = gen.collect()
    finally:
        gen.close()
    return jsonify(shape.response([done]))


@bp.post("/completions")
@require_api_key
def completions():
    rt = runtime()
    req = schema.parse_openai_completion(request_json(), max_model_len=rt.engine.max_model_len,
                                         defaults=defaults(max_tokens=COMPLETIONS_MAX_TOKENS))
    gens = rt.start_many([(p, None, req.params) for p in req.prompts])
    shape = _Shape("text", rt, req)
    if req.stream:
        return sse_response(_stream(gens[0], shape, req.include_usage), gens[0].close)
    try:
        done = [g.collect() for g in gens]
    finally:
        for gen in gens:
            gen.close()
    return jsonify(shape.response(done))


class _Shape:
    """OpenAI's objects for one request: chat ('chat.completion[.chunk]') or text ('text_completion')."""

    def __init__(self, kind: str, rt, req):
        self.kind, self.rt, self.req = kind, rt, req
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model = req.model or rt.model_name

    def _head(self, object_: str) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def logprobs(self, entries):
        if not self.req.want_logprobs or not entries:
            return None
        tok = self.rt.engine.tokenizer
        text = getattr(tok, "token_text", None) or ((lambda i: tok.decode([i])) if tok is not None else str)
        if self.kind == "chat":
            return {"content": [{"token": text(e["token_id"]), "logprob": e["logprob"],
                                 "bytes": list(text(e["token_id"]).encode()),
                                 "top_logprobs": [{"token": text(t), "logprob": lp, "bytes": list(text(t).encode())}
                                                  for t, lp in e["top"]]} for e in entries]}
        return {"tokens": [text(e["token_id"]) for e in entries],
                "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{text(t): lp for t, lp in e["top"]} for e in entries], "text_offset": None}

    def choice(self, index: int, text: str | None, finish_reason, logprobs=None, delta: dict | None = None):
        if self.kind == "chat":
            body = {"delta": delta} if delta is not None else {"message": {"role": "assistant", "content": text}}
            return {"index": index, **body, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def response(self, done: list) -> dict:
        usage = {"prompt_tokens": sum(d.num_prompt_tokens for d in done),
                 "completion_tokens": sum(d.num_generated_tokens for d in done)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {**self._head("chat.completion" if self.kind == "chat" else "text_completion"),
                "choices": [self.choice(i, d.text, _finish(d.finish_reason), self.logprobs(d.logprobs))
                            for i, d in enumerate(done)], "usage": usage}

    def chunk(self, choices: list, usage=None, include_usage: bool = False) -> bytes:
        body = {**self._head("chat.completion.chunk" if self.kind == "chat" else "text_completion"),
                "choices": choices}
        if include_usage:
            body["usage"] = usage
        return schema.sse(body)


def _finish(reason: str | None) -> str | None:
    return "stop" if reason == "abort" else reason


def _stream(gen, shape: _Shape, include_usage: bool):
    """OpenAI chunks for one Generation; a client gone mid-stream aborts the request."""
    chat = shape.kind == "chat"
    try:
        if chat:
            yield shape.chunk([shape.choice(0, None, None, delta={"role": "assistant", "content": ""})],
                              include_usage=include_usage)
        last = None
        for out in gen.outputs(poll_s=KEEPALIVE_S):
            if out is None:
                yield schema.SSE_KEEPALIVE
                continue
            last = out
            if out.text or out.logprobs:
                lp = shape.logprobs(out.logprobs)
                yield shape.chunk([shape.choice(0, out.text, None, lp, {"content": out.text} if chat else None)],
                                  include_usage=include_usage)
        yield shape.chunk([shape.choice(0, "", _finish(last.finish_reason), None, {} if chat else None)],
                          include_usage=include_usage)
        if include_usage:
            usage = {"prompt_tokens": last.num_prompt_tokens, "completion_tokens": last.num_generated_tokens,
                     "total_tokens": last.num_prompt_tokens + last.num_generated_tokens}
            yield shape.chunk([], usage, include_usage=True)
        yield schema.sse("[DONE]")
    except schema.ApiError as err:
        yield schema.sse(err.body())
    finally:
        gen.close()
