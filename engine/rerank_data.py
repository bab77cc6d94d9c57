"""Reranker data: the JSONL export of beam searches, the users' choices, and learning the head from them.

One line a beam search:
    {"id": "<uuid hex>", "prompt": str,
     "candidates": [{"text", "token_ids", "lm_score", "features": {name: float}, "rerank_score"}],
     "chosen": int index into candidates, or null until the user picks}
Only records with `chosen` set and two or more candidates count for training and evaluation.
"""
from __future__ import annotations

import fcntl
import json
import math
import random
import uuid
from pathlib import Path

from engine.reranker import FEATURE_NAMES, RerankWeights, as_weights


# ---------------------------------------------------------------------------------------------
# Records and the JSONL file
# ---------------------------------------------------------------------------------------------

def _is_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def validate_record(rec) -> dict:
    """The record itself if it has the export shape; else a ValueError saying what is wrong."""
    if not isinstance(rec, dict):
        raise ValueError(f"a record must be a JSON object, got {type(rec).__name__}")
    if "id" in rec and not isinstance(rec["id"], str):
        raise ValueError("'id' must be a string")
    if not isinstance(rec.get("prompt"), str):
        raise ValueError("'prompt' must be a string")
    cands = rec.get("candidates")
    if not isinstance(cands, list) or not cands:
        raise ValueError("'candidates' must be a non-empty list")
    for i, c in enumerate(cands):
        where = f"candidates[{i}]"
        if not isinstance(c, dict):
            raise ValueError(f"{where} must be an object")
        if not isinstance(c.get("text"), str):
            raise ValueError(f"{where}.text must be a string")
        ids = c.get("token_ids")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError(f"{where}.token_ids must be a list of integers")
        if not _is_number(c.get("lm_score")):
            raise ValueError(f"{where}.lm_score must be a finite number")
        feats = c.get("features", {})
        if not isinstance(feats, dict) or not all(_is_number(v) for v in feats.values()):
            raise ValueError(f"{where}.features must map names to finite numbers")
        if c.get("rerank_score") is not None and not _is_number(c["rerank_score"]):
            raise ValueError(f"{where}.rerank_score must be a finite number or null")
    chosen = rec.get("chosen")
    if chosen is not None and (isinstance(chosen, bool) or not isinstance(chosen, int)
                               or not 0 <= chosen < len(cands)):
        raise ValueError(f"'chosen' must be null or an index in [0, {len(cands)}), got {chosen!r}")
    return rec


def make_record(prompt: str, candidates: list[dict], chosen: int | None = None,
                record_id: str | None = None) -> dict:
    """A validated record; candidates keep only the exported keys (features {} and score null if absent)."""
    cands = [{"text": c.get("text"), "token_ids": list(c.get("token_ids") or []), "lm_score": c.get("lm_score"),
              "features": dict(c.get("features") or {}), "rerank_score": c.get("rerank_score")}
             for c in candidates]
    rec = {"id": record_id or uuid.uuid4().hex, "prompt": prompt, "candidates": cands, "chosen": chosen}
    return validate_record(rec)


def append_jsonl(path: str | Path, prompt: str, candidates: list[dict], chosen: int | None = None,
                 record_id: str | None = None) -> str:
    """Append one record (one line, under an exclusive file lock); returns its id."""
    rec = make_record(prompt, candidates, chosen, record_id)
    line = json.dumps(rec, allow_nan=False, ensure_ascii=False) + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.write(line)
            f.flush()
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    return rec["id"]


def record_choice(path: str | Path, record_id: str, chosen: int | None) -> dict:
    """Set `chosen` of the record with this id (rewritten in place under the lock); returns the record."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "r+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            lines = f.read().splitlines(keepends=True)
            for n, line in enumerate(lines):
                if not line.strip():
                    continue
                rec = _parse_line(path, n + 1, line)
                if rec.get("id") != record_id:
                    continue
                rec["chosen"] = chosen
                try:
                    validate_record(rec)
                except ValueError as exc:
                    raise ValueError(f"record {record_id}: {exc}") from exc
                lines[n] = json.dumps(rec, allow_nan=False, ensure_ascii=False) + "\n"
                f.seek(0)
                f.write("".join(lines))
                f.truncate()
                f.flush()
                return rec
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    raise KeyError(f"{path}: no record with id {record_id!r}")


def _parse_line(path: Path, lineno: int, line: str) -> dict:
    try:
        return validate_record(json.loads(line))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
    except ValueError as exc:
        raise ValueError(f"{path}:{lineno}: {exc}") from exc


def read_jsonl(path: str | Path) -> list[dict]:
    """Every record of the file, validated; blank lines skipped; a ValueError names path:line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        return [_parse_line(path, n, line) for n, line in enumerate(f, 1) if line.strip()]


# ---------------------------------------------------------------------------------------------
# Evaluation and training of the linear head
# ---------------------------------------------------------------------------------------------

def labelled(records: list[dict]) -> list[dict]:
    """The records that say something about ranking: `chosen` set and at least two candidates."""
    return [r for r in records if r.get("chosen") is not None and len(r["candidates"]) >= 2]


def _feature_rows(rec: dict, names) -> list[list[float]]:
    rows = []
    for i, c in enumerate(rec["candidates"]):
        missing = [n for n in names if n not in c.get("features", {})]
        if missing:
            raise ValueError(f"record {rec.get('id', '?')}: candidates[{i}] lacks features {missing}")
        rows.append([float(c["features"][n]) for n in names])
    return rows


def _rank_of_chosen(scores: list[float], chosen: int) -> int:
    """1 + how many others score at least as high: ties count against, so constant scores earn nothing."""
    return 1 + sum(1 for j, s in enumerate(scores) if j != chosen and s >= scores[chosen])


def evaluate(records: list[dict], weights) -> dict:
    """Top-1 accuracy and MRR of LM score alone and of the reranker over the labelled records."""
    head = as_weights(weights)
    recs = labelled(records)
    if not recs:
        raise ValueError("no labelled records (need 'chosen' set and two or more candidates)")
    lm_ranks, rr_ranks = [], []
    for rec in recs:
        _feature_rows(rec, head.features)
        lm_ranks.append(_rank_of_chosen([c["lm_score"] for c in rec["candidates"]], rec["chosen"]))
        rr_ranks.append(_rank_of_chosen([head.score(c["features"]) for c in rec["candidates"]], rec["chosen"]))

    def summary(ranks):
        return {"top1": sum(r == 1 for r in ranks) / len(ranks), "mrr": sum(1 / r for r in ranks) / len(ranks)}
    return {"num_records": len(recs), "lm": summary(lm_ranks), "reranker": summary(rr_ranks)}


def split(records: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, validation): a seeded shuffle; validation gets round(n * val_fraction), at least one each."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if len(records) < 2:
        raise ValueError(f"need at least 2 labelled records to split, got {len(records)}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    num_val = min(len(records) - 1, max(1, round(len(records) * val_fraction)))
    return [records[i] for i in order[num_val:]], [records[i] for i in order[:num_val]]


def finetune(records: list[dict], val_fraction: float = 0.25, seed: int = 0, steps: int = 300,
             lr: float = 0.05, l2: float = 1e-3, features: tuple[str, ...] = FEATURE_NAMES) -> tuple[dict, dict]:
    """Train the head with a pairwise logistic loss (chosen over each other candidate); (weights, metrics)."""
    import torch
    if steps < 1 or not lr > 0 or not l2 >= 0:
        raise ValueError(f"need steps >= 1, lr > 0, l2 >= 0; got {steps}, {lr}, {l2}")
    train, val = split(labelled(records), val_fraction, seed)
    rows = [torch.tensor(_feature_rows(r, features), dtype=torch.float64) for r in train]  # [num_cands, F] each
    for r in val:
        _feature_rows(r, features)
    stacked = torch.cat(rows)                                            # [num_train_cands, F]
    mean = stacked.mean(0)
    std = stacked.std(0, unbiased=False)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))             # a constant feature stays put
    diffs = []
    for rec, x in zip(train, rows):
        z = (x - mean) / std
        others = [j for j in range(len(z)) if j != rec["chosen"]]
        diffs.append(z[rec["chosen"]] - z[others])                      # [num_cands - 1, F]
    pair_diffs = torch.cat(diffs)                                        # [num_pairs, F]

    w = torch.zeros(len(features), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.softplus(-(pair_diffs @ w)).mean() + l2 * (w * w).sum()
            loss.backward()
            opt.step()
    head = RerankWeights(tuple(features), tuple(w.detach().tolist()), 0.0, tuple(mean.tolist()),
                         tuple(std.tolist()), "")
    metrics = {"num_train": len(train), "num_val": len(val), "num_pairs": int(pair_diffs.shape[0]),
               "seed": seed, "final_loss": float(loss.detach()), "validation": evaluate(val, head)}
    comment = (f"rerank-finetune: {len(train)} train / {len(val)} validation records, seed {seed}; "
               f"validation top-1 {metrics['validation']['reranker']['top1']:.3f} "
               f"(LM score alone {metrics['validation']['lm']['top1']:.3f})")
    return {**head.to_dict(), "comment": comment}, metrics
