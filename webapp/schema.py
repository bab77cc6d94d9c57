"""JSON <-> requests and events, once for every route (JSON, SSE, WebSocket, OpenAI).

Every parse_* function either returns a typed request or raises ApiError (a 4xx with a JSON body
that names the offending field). Every *_event / *_body function turns engine outputs into JSON.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields

from engine.sequence import SamplingParams

ROLES = ("system", "user", "assistant")
MAX_BATCH_PROMPTS = 64
# field -> (kind, SamplingParams name). Kinds: int, number, bool, stop (str or list of str), ids.
SAMPLING_FIELDS = {
    "max_tokens": "int", "temperature": "number", "top_k": "int", "top_p": "number", "min_p": "number",
    "repetition_penalty": "number", "presence_penalty": "number", "frequency_penalty": "number",
    "seed": "int", "stop": "stop", "stop_token_ids": "ids", "ignore_eos": "bool", "logprobs": "int",
    "min_tokens": "int",
}
_PARAM_NAMES = {f.name for f in fields(SamplingParams)}


class ApiError(Exception):
    """A client error: HTTP status plus the OpenAI-style error body {"error": {...}}."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param = message, status, type, param

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param)


def error_body(message: str, type: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": None}}


@dataclass(frozen=True)
class GenerateRequest:
    """One prompt (text or token ids) or one chat (messages), with its sampling parameters."""

    prompt: str | list[int] | None
    messages: list[dict] | None
    params: SamplingParams


# ---- bodies -----------------------------------------------------------------------------------
def _reject_constant(name: str):
    # NaN and Infinity are not JSON (RFC 8259); Python's json accepts them unless told not to.
    raise ApiError(f"invalid JSON: {name} is not a JSON value (numbers must be finite)")


def load_json(raw: bytes) -> dict:
    """A request body as a JSON object: strict UTF-8, strict JSON, an object at the top."""
    if not raw:
        raise ApiError("the request body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(f"the request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ApiError(f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(data, dict):
        raise ApiError(f"the request body must be a JSON object, got {_kind(data)}")
    return data


def _kind(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null", int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _check_text(value: str, field: str) -> str:
    try:
        value.encode("utf-8")  # lone surrogates (\ud800) parse as JSON but are not text
    except UnicodeEncodeError:
        raise ApiError(f"{field} contains an unpaired surrogate (not valid Unicode text)",
                       param=_top(field)) from None
    return value


def _top(field: str) -> str:
    """The top-level field an error belongs to: messages[2].content -> messages."""
    return field.split("[", 1)[0].split(".", 1)[0]


# ---- sampling parameters ----------------------------------------------------------------------
def _typed(field: str, kind: str, value):
    if kind == "int":
        if isinstance(value, float) and value.is_integer() and math.isfinite(value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ApiError(f"{field} must be an integer, got {_kind(value)}", param=field)
    elif kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ApiError(f"{field} must be a number, got {_kind(value)}", param=field)
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ApiError(f"{field} must be true or false, got {_kind(value)}", param=field)
    elif kind == "stop":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value) or len(value) > 16:
            raise ApiError(f"{field} must be a non-empty string or a list of up to 16 of them", param=field)
        value = tuple(_check_text(s, field) for s in value)
    elif kind == "ids":
        if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            raise ApiError(f"{field} must be a list of integers", param=field)
        value = tuple(value)
    return value


def make_params(options: dict, *, max_model_len: int, defaults: dict | None = None) -> SamplingParams:
    """SamplingParams from already-named options; any invalid value becomes a 400 naming it."""
    kwargs = dict(defaults or {})
    for field, value in options.items():
        if value is None:  # JSON null: use the default
            continue
        kwargs[field] = _typed(field, SAMPLING_FIELDS[field], value)
    max_tokens = kwargs.get("max_tokens")
    if isinstance(max_tokens, int) and max_tokens > max_model_len:
        raise ApiError(f"max_tokens must be <= {max_model_len} (the model's context), got {max_tokens}",
                       param="max_tokens")
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        first = str(exc).split(" ", 1)[0]
        raise ApiError(str(exc), param=first if first in _PARAM_NAMES else None) from None


def _sampling_options(data: dict, allowed: set[str]) -> dict:
    unknown = sorted(set(data) - allowed - set(SAMPLING_FIELDS))
    if unknown:
        raise ApiError(f"unknown field(s) {unknown}; sampling fields are {sorted(SAMPLING_FIELDS)}",
                       param=unknown[0])
    return {k: v for k, v in data.items() if k in SAMPLING_FIELDS}


# ---- prompts and messages ---------------------------------------------------------------------
def parse_prompt(value, field: str = "prompt") -> str | list[int]:
    """A text prompt or a list of token ids."""
    if isinstance(value, str):
        if not value:
            raise ApiError(f"{field} is empty", param=_top(field))
        return _check_text(value, field)
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    raise ApiError(f"{field} must be a non-empty string or a non-empty list of token ids, got {_kind(value)}",
                   param=_top(field))


def _content_text(content, field: str) -> str:
    if isinstance(content, str):
        return _check_text(content, field)
    if isinstance(content, list):  # OpenAI content parts: [{"type": "text", "text": ...}]
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ApiError(f"{field} parts must be {{\"type\": \"text\", \"text\": ...}}", param=_top(field))
            parts.append(_check_text(part["text"], field))
        return "".join(parts)
    raise ApiError(f"{field} must be a string, got {_kind(content)}", param=_top(field))


def parse_messages(value, field: str = "messages") -> list[dict]:
    """A chat: a non-empty list of {"role": system|user|assistant, "content": text}."""
    if not isinstance(value, list) or not value:
        raise ApiError(f"{field} must be a non-empty list of messages, got {_kind(value)}", param=field)
    messages = []
    for i, msg in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(msg, dict):
            raise ApiError(f"{where} must be an object with role and content, got {_kind(msg)}", param=field)
        role = msg.get("role")
        if role not in ROLES:
            raise ApiError(f"{where}.role must be one of {list(ROLES)}, got {role!r}", param=field)
        if "content" not in msg:
            raise ApiError(f"{where}.content is missing", param=field)
        messages.append({"role": role, "content": _content_text(msg["content"], f"{where}.content")})
    return messages


def parse_generate(data: dict, *, max_model_len: int, defaults: dict | None = None) -> GenerateRequest:
    """/generate, /stream and WebSocket chat: "prompt" or "messages", sampling fields at the top
    level or inside "params"."""
    options = dict(data)
    nested = options.pop("params", None)
    options.pop("type", None)  # WebSocket frames carry their type
    if nested is not None:
        if not isinstance(nested, dict):
            raise ApiError(f"params must be an object, got {_kind(nested)}", param="params")
        options.update(nested)
    prompt, messages = options.pop("prompt", None), options.pop("messages", None)
    if (prompt is None) == (messages is None):
        raise ApiError("send exactly one of prompt (text or token ids) or messages (a chat)",
                       param="prompt" if prompt is None else "messages")
    sampling = _sampling_options(options, set())
    return GenerateRequest(parse_prompt(prompt) if prompt is not None else None,
                           parse_messages(messages) if messages is not None else None,
                           make_params(sampling, max_model_len=max_model_len, defaults=defaults))


def parse_batch(data: dict, *, max_model_len: int, defaults: dict | None = None) -> list[GenerateRequest]:
    """/generate_batch: {"prompts": [...], sampling fields shared by all}."""
    options = dict(data)
    prompts = options.pop("prompts", None)
    if not isinstance(prompts, list) or not prompts:
        raise ApiError(f"prompts must be a non-empty list, got {_kind(prompts)}", param="prompts")
    if len(prompts) > MAX_BATCH_PROMPTS:
        raise ApiError(f"prompts holds {len(prompts)} items; at most {MAX_BATCH_PROMPTS}", param="prompts")
    params = make_params(_sampling_options(options, set()), max_model_len=max_model_len, defaults=defaults)
    return [GenerateRequest(parse_prompt(p, f"prompts[{i}]"), None, params) for i, p in enumerate(prompts)]


# ---- events and bodies out --------------------------------------------------------------------
def usage_body(out) -> dict:
    """Token counts of a finished request (a RequestOutput or a Completion)."""
    return {"prompt_tokens": out.num_prompt_tokens, "completion_tokens": out.num_generated_tokens,
            "total_tokens": out.num_prompt_tokens + out.num_generated_tokens,
            "cached_tokens": out.num_cached_tokens}


def delta_event(out) -> dict:
    return {"type": "delta", "text": out.text, "token_ids": list(out.token_ids)}


def done_event(out, timing: dict) -> dict:
    return {"type": "done", "finish_reason": out.finish_reason, "usage": usage_body(out), "timing": timing}


def error_event(err: ApiError) -> dict:
    return {"type": "error", **err.body()}


def completion_body(request_id: str, completion, timing: dict) -> dict:
    """/generate's answer (and each item of /generate_batch's)."""
    return {"id": request_id, "text": completion.text, "token_ids": completion.token_ids,
            "finish_reason": completion.finish_reason, "usage": usage_body(completion), "timing": timing}


def sse(data) -> bytes:
    """One Server-Sent Event carrying JSON (or a literal string such as [DONE])."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


SSE_KEEPALIVE = b": keep-alive\n\n"  # a comment line: clients ignore it; a write finds a gone client


# ---- OpenAI-compatible requests ---------------------------------------------------------------
@dataclass(frozen=True)
class OpenAIRequest:
    """/v1/chat/completions (messages) or /v1/completions (prompts), with the stream options."""

    prompts: list[str | list[int]] | None
    messages: list[dict] | None
    params: SamplingParams
    stream: bool
    include_usage: bool
    model: str | None
    want_logprobs: bool


_OPENAI_IGNORED = {"user", "metadata", "store", "service_tier", "logit_bias", "parallel_tool_calls",
                   "response_format", "tool_choice", "modalities", "reasoning_effort", "prediction"}
_OPENAI_SAMPLING = {"max_tokens", "temperature", "top_p", "stop", "seed", "presence_penalty",
                    "frequency_penalty", "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos",
                    "stop_token_ids"}


def _openai_common(data: dict, known: set[str]) -> tuple[dict, bool, bool, str | None]:
    unknown = sorted(set(data) - known - _OPENAI_SAMPLING - _OPENAI_IGNORED)
    if unknown:
        raise ApiError(f"unsupported field(s) {unknown}", param=unknown[0])
    for field, wanted in (("n", 1), ("best_of", 1)):
        if data.get(field) not in (None, wanted):
            raise ApiError(f"{field} must be 1 (one choice per request is supported)", param=field)
    if data.get("tools"):
        raise ApiError("tools are not supported by this server", param="tools")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(f"model must be a string, got {_kind(model)}", param="model")
    stream = False if data.get("stream") is None else _typed("stream", "bool", data["stream"])
    opts = data.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise ApiError(f"stream_options must be an object, got {_kind(opts)}", param="stream_options")
        if not stream:
            raise ApiError("stream_options is only allowed with stream: true", param="stream_options")
        include_usage = _typed("stream_options.include_usage", "bool", opts.get("include_usage", False))
    options = {k: data[k] for k in _OPENAI_SAMPLING if k in data}
    return options, stream, include_usage, model


def parse_openai_chat(data: dict, *, max_model_len: int, defaults: dict | None = None) -> OpenAIRequest:
    """An OpenAI chat completion request (unsupported features are a 400, not silently ignored)."""
    known = {"model", "messages", "n", "stream", "stream_options", "logprobs", "top_logprobs",
             "max_completion_tokens", "tools"}
    options, stream, include_usage, model = _openai_common(data, known)
    if data.get("max_completion_tokens") is not None:
        options["max_tokens"] = data["max_completion_tokens"]
    want_logprobs = _typed("logprobs", "bool", data["logprobs"]) if data.get("logprobs") is not None else False
    if data.get("top_logprobs") is not None:
        if not want_logprobs:
            raise ApiError("top_logprobs needs logprobs: true", param="top_logprobs")
        options["logprobs"] = data["top_logprobs"]
    elif want_logprobs:
        options["logprobs"] = 0
    if "messages" not in data:
        raise ApiError("messages is missing", param="messages")
    params = make_params(options, max_model_len=max_model_len, defaults=defaults)
    return OpenAIRequest(None, parse_messages(data["messages"]), params, stream, include_usage, model,
                         want_logprobs)


def parse_openai_completion(data: dict, *, max_model_len: int, defaults: dict | None = None) -> OpenAIRequest:
    """An OpenAI (legacy) completion request: prompt is text, token ids, or a list of either."""
    known = {"model", "prompt", "n", "best_of", "stream", "stream_options", "logprobs", "echo", "suffix"}
    options, stream, include_usage, model = _openai_common(data, known)
    if data.get("echo"):
        raise ApiError("echo is not supported by this server", param="echo")
    if data.get("suffix") is not None:
        raise ApiError("suffix is not supported by this server", param="suffix")
    if data.get("logprobs") is not None:
        options["logprobs"] = data["logprobs"]
    prompt = data.get("prompt")
    if prompt is None:
        raise ApiError("prompt is missing", param="prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > MAX_BATCH_PROMPTS:
            raise ApiError(f"prompt holds {len(prompt)} prompts; at most {MAX_BATCH_PROMPTS}", param="prompt")
        prompts = [parse_prompt(p, "prompt") for p in prompt]
    else:
        prompts = [parse_prompt(prompt, "prompt")]
    if stream and len(prompts) > 1:
        raise ApiError("streaming takes one prompt per request", param="prompt")
    params = make_params(options, max_model_len=max_model_len, defaults=defaults)
    return OpenAIRequest(prompts, None, params, stream, include_usage, model, params.logprobs is not None)
