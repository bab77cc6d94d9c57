"""JSON <-> beam search requests and events (shared by /stream_chat_beam, /generate, the WebSocket).

Request fields: "prompt" or "messages", and beam_width (1..16), max_tokens, length_penalty,
early_stopping (true, false or "never"), num_return, stop_token_ids, rerank (default true), at the
top level or inside "params". Sampling fields (temperature, top_p, ...) do not apply: a 400 says so.
Events: {"type": "beam_step", "nodes", "dropped"} per step, then {"type": "beam_done", ...}.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.beam import BeamParams
from webapp.schema import SAMPLING_FIELDS, ApiError, _kind, _typed, parse_messages, parse_prompt, usage_body

BEAM_FIELDS = {"beam_width": "int", "max_tokens": "int", "length_penalty": "number", "early_stopping": "early",
               "num_return": "int", "stop_token_ids": "ids", "rerank": "bool"}
BEAM_DEFAULT_MAX_TOKENS = 32        # BeamParams' own default: a tree of W x 32 steps stays readable
MAX_RECORD_ID_CHARS = 64


@dataclass(frozen=True)
class BeamSpec:
    """One beam search as asked for: the prompt or chat, BeamParams, and whether to rerank."""

    prompt: str | list[int] | None
    messages: list[dict] | None
    params: BeamParams
    rerank: bool


def _flatten(data: dict) -> dict:
    """The body with "params" merged in and a WebSocket frame's "type" dropped."""
    options = dict(data)
    nested = options.pop("params", None)
    options.pop("type", None)
    if nested is not None:
        if not isinstance(nested, dict):
            raise ApiError(f"params must be an object, got {_kind(nested)}", param="params")
        options.update(nested)
    return options


def wants_beam(data: dict) -> bool:
    """True when a /generate body or a chat frame asks for beam search: beam_width other than 1
    (an invalid width counts, so that parse_beam reports it)."""
    nested = data.get("params")
    width = nested.get("beam_width") if isinstance(nested, dict) and "beam_width" in nested else data.get("beam_width")
    if width is None:
        return False
    return isinstance(width, bool) or width != 1


def without_beam_width(data: dict) -> dict:
    """The body without beam_width (width 1 is plain generation, which takes no such field)."""
    out = {k: v for k, v in data.items() if k != "beam_width"}
    if isinstance(out.get("params"), dict):
        out["params"] = {k: v for k, v in out["params"].items() if k != "beam_width"}
    return out


def _early_stopping(value):
    if value is True or value is False or value == "never":
        return value
    raise ApiError(f"early_stopping must be true, false or \"never\", got {_kind(value)}", param="early_stopping")


def parse_beam(data: dict, *, max_model_len: int) -> BeamSpec:
    """A beam search request, or ApiError (400) naming the offending field."""
    options = _flatten(data)
    prompt, messages = options.pop("prompt", None), options.pop("messages", None)
    if (prompt is None) == (messages is None):
        raise ApiError("send exactly one of prompt (text or token ids) or messages (a chat)",
                       param="prompt" if prompt is None else "messages")
    unknown = sorted(set(options) - set(BEAM_FIELDS))
    sampling = [f for f in unknown if f in SAMPLING_FIELDS]
    if sampling:
        raise ApiError(f"{sampling[0]} does not apply to beam search (it keeps the most likely continuations); "
                       f"beam fields are {sorted(BEAM_FIELDS)}", param=sampling[0])
    if unknown:
        raise ApiError(f"unknown field(s) {unknown}; beam fields are {sorted(BEAM_FIELDS)}", param=unknown[0])
    kwargs = {"max_tokens": BEAM_DEFAULT_MAX_TOKENS}
    rerank = True
    for field, value in options.items():
        if value is None:  # JSON null: the default
            continue
        kind = BEAM_FIELDS[field]
        value = _early_stopping(value) if kind == "early" else _typed(field, kind, value)
        if field == "rerank":
            rerank = value
        else:
            kwargs[field] = value
    if kwargs["max_tokens"] > max_model_len:
        raise ApiError(f"max_tokens must be <= {max_model_len} (the model's context), got {kwargs['max_tokens']}",
                       param="max_tokens")
    try:
        params = BeamParams(**kwargs)
    except ValueError as exc:
        first = str(exc).split(" ", 1)[0]
        raise ApiError(str(exc), param=first if first in BEAM_FIELDS else None) from None
    return BeamSpec(parse_prompt(prompt) if prompt is not None else None,
                    parse_messages(messages) if messages is not None else None, params, rerank)


def parse_choice(data: dict) -> tuple[str, int | None]:
    """/beam_choice: {"record_id": str, "chosen": index into the record's candidates, or null}."""
    unknown = sorted(set(data) - {"record_id", "chosen"})
    if unknown:
        raise ApiError(f"unknown field(s) {unknown}; send record_id and chosen", param=unknown[0])
    record_id = data.get("record_id")
    if not isinstance(record_id, str) or not record_id or len(record_id) > MAX_RECORD_ID_CHARS:
        raise ApiError(f"record_id must be a non-empty string of at most {MAX_RECORD_ID_CHARS} characters "
                       f"(the record_id of a beam_done event), got {_kind(record_id)}", param="record_id")
    if "chosen" not in data:
        raise ApiError("chosen is missing: the index of the candidate picked (or null to clear)", param="chosen")
    chosen = data["chosen"]
    if chosen is not None:
        chosen = _typed("chosen", "int", chosen)
        if chosen < 0:
            raise ApiError(f"chosen must be an index >= 0, got {chosen}", param="chosen")
    return record_id, chosen


# ---- events and bodies out --------------------------------------------------------------------
def beam_step_event(out) -> dict:
    """One search step: the new tree nodes and the kept nodes no candidate extends any more."""
    return {"type": "beam_step", "nodes": list(out.beam_nodes or []), "dropped": list(out.beam_dropped or [])}


def beam_done_event(out, result, timing: dict) -> dict:
    """The end: candidates in reranked order (or LM order), the record id, and the whole tree."""
    return {"type": "beam_done", "finish_reason": out.finish_reason, "candidates": result.candidates,
            "record_id": result.record_id, "reranked": result.reranked, "tree": list(out.beam_tree or []),
            "usage": usage_body(out), "peak_blocks": out.peak_blocks, "timing": timing}


def beam_body(request_id: str, out, result, timing: dict) -> dict:
    """/generate's answer with beam_width > 1: the top candidate as text, every candidate beside it."""
    top = result.candidates[0] if result.candidates else {"text": "", "token_ids": []}
    return {"id": request_id, "text": top["text"], "token_ids": list(top["token_ids"]),
            "finish_reason": out.finish_reason, "candidates": result.candidates, "record_id": result.record_id,
            "reranked": result.reranked, "usage": usage_body(out), "peak_blocks": out.peak_blocks,
            "timing": timing}
