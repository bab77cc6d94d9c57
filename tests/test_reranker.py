"""Reranker: features (real MiniLM), ranking, the JSONL export, and that finetuning learns a stated preference."""
from __future__ import annotations

import json
import math
import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine import rerank_cli  # noqa: E402
from engine.rerank_data import (append_jsonl, evaluate, finetune, read_jsonl, record_choice,  # noqa: E402
                                split)
from engine.reranker import (FEATURE_NAMES, Reranker, RerankWeights, lm_logprob, log_length,  # noqa: E402
                             repetition_ratio)


@pytest.fixture(scope="module")
def reranker() -> Reranker:
    """The shipped head over the real MiniLM (loaded once for the module)."""
    return Reranker.load()


HAND_SET = {"features": list(FEATURE_NAMES), "weights": [1.0, 0.6, -0.6, 0.1], "bias": 0.0,
            "mean": [-0.8, 0.45, 0.05, 3.5], "std": [0.5, 0.2, 0.1, 0.8]}   # config/reranker.json as shipped


def cand(text: str, logprob_sum: float = -4.0, num_tokens: int | None = None) -> dict:
    n = num_tokens if num_tokens is not None else len(text.split())
    return {"text": text, "token_ids": list(range(n)), "lm_score": logprob_sum / max(n, 1),
            "logprob_sum": logprob_sum, "num_tokens": n}


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------

def test_repetition_ratio_exact():
    assert repetition_ratio("") == 0.0
    assert repetition_ratio("single") == 0.0
    assert repetition_ratio("the cat sat on the mat") == 0.0          # 5 bigrams, all distinct
    assert repetition_ratio("a b a b") == pytest.approx(1 / 3)          # ab, ba, ab
    assert repetition_ratio("go go go go go") == pytest.approx(3 / 4)   # 4 bigrams, 1 distinct
    assert repetition_ratio("Yes, yes. YES yes!") == pytest.approx(2 / 3)  # case and punctuation ignored


def test_length_and_lm_features():
    assert lm_logprob(-6.0, 3) == -2.0
    assert lm_logprob(0.0, 0) == 0.0
    assert log_length(0) == 0.0
    assert log_length(31) == pytest.approx(math.log(32))


def test_features_with_real_minilm(reranker):
    prompt = "How do I bake fresh bread at home?"
    cands = [cand("Mix flour, water, yeast and salt, let the dough rise, then bake the loaf in a hot oven.", -9.0, 18),
             cand("The football match ended in a draw after extra time.", -3.0, 10),
             cand("bread bread bread bread bread", -2.0, 5)]
    feats = reranker.features(prompt, cands)
    assert [sorted(f) for f in feats] == [sorted(FEATURE_NAMES)] * 3
    assert feats[0]["relevance"] > feats[1]["relevance"] + 0.2          # on-topic beats off-topic
    assert all(-1.0 <= f["relevance"] <= 1.0 for f in feats)
    assert feats[0]["lm_logprob"] == pytest.approx(-0.5)
    assert feats[2]["repetition"] == pytest.approx(3 / 4)
    assert feats[1]["log_length"] == pytest.approx(math.log(11))


def test_embeddings_batched_equal_single(reranker):
    texts = ["a short one", "a considerably longer sentence about rivers and mountains in spring", "x"]
    together = reranker.embed(texts)
    alone = [reranker.embed([t])[0] for t in texts]
    for row, single in zip(together, alone):
        assert float(row.norm()) == pytest.approx(1.0, abs=1e-5)
        assert float((row - single).abs().max()) < 1e-4                  # padding does not leak into the mean


def test_rank_orders_by_score(reranker):
    prompt = "Tell me about the ocean."
    cands = [cand("The stock market fell sharply today and traders worried.", -6.0, 10),
             cand("The ocean covers most of the Earth and is home to whales.", -6.0, 12),
             cand("ocean ocean ocean ocean ocean ocean ocean ocean", -3.0, 8)]
    head = {**HAND_SET, "weights": [0.0, 1.0, -1.0, 0.0]}           # relevance up, repetition down
    ranked = reranker.with_weights(head).rank(prompt, cands)
    assert [c["index"] for c in ranked] == [1, 0, 2]
    scores = [c["rerank_score"] for c in ranked]
    assert scores == sorted(scores, reverse=True)
    for c in ranked:
        assert c["rerank_score"] == pytest.approx(RerankWeights.from_dict(head).score(c["features"]))
        assert c["text"] == cands[c["index"]]["text"] and c["num_tokens"] == cands[c["index"]]["num_tokens"]
    # LM score alone: the mean logprob decides (-0.375 > -0.5 > -0.6)
    by_lm = reranker.with_weights({**HAND_SET, "weights": [1.0, 0.0, 0.0, 0.0]}).rank(prompt, cands)
    assert [c["index"] for c in by_lm] == [2, 1, 0] and by_lm[0]["features"]["lm_logprob"] == -0.375


def test_bad_candidates_rejected(reranker):
    with pytest.raises(ValueError, match=r"candidates\[0\].num_tokens"):
        reranker.features("p", [{"text": "x", "logprob_sum": -1.0, "num_tokens": -1}])
    with pytest.raises(ValueError, match=r"candidates\[1\].text"):
        reranker.features("p", [cand("ok"), {"logprob_sum": -1.0, "num_tokens": 1}])


def test_weights_validation(tmp_path):
    good = RerankWeights.from_dict({**HAND_SET, "comment": "c"}).to_dict()
    assert RerankWeights.from_dict(good).to_dict() == good
    for key, bad in (("weights", [1.0]), ("std", [1.0, 0.0, 1.0, 1.0]), ("features", ["lm_logprob", "nope"])):
        with pytest.raises(ValueError, match=key):
            RerankWeights.from_dict({**good, key: bad})
    path = tmp_path / "w.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="w.json"):
        RerankWeights.load(path)


# ---------------------------------------------------------------------------------------------
# JSONL
# ---------------------------------------------------------------------------------------------

def test_jsonl_round_trip_and_choice(tmp_path, reranker):
    path = tmp_path / "sub" / "beams.jsonl"
    ranked = reranker.rank("Name a fruit.", [cand("An apple.", -2.0, 3), cand("A car.", -1.0, 3)])
    id_a = append_jsonl(path, "Name a fruit.", ranked)
    id_b = append_jsonl(path, "Second prompt.", [cand("one"), cand("two")], chosen=1)
    records = read_jsonl(path)
    assert [r["id"] for r in records] == [id_a, id_b] and id_a != id_b
    assert records[0]["chosen"] is None and records[1]["chosen"] == 1
    first = records[0]["candidates"][0]
    assert set(first) == {"text", "token_ids", "lm_score", "features", "rerank_score"}
    assert first["features"] == ranked[0]["features"] and first["rerank_score"] == ranked[0]["rerank_score"]

    rec = record_choice(path, id_a, 1)
    assert rec["chosen"] == 1
    again = read_jsonl(path)
    assert [r["chosen"] for r in again] == [1, 1]
    assert again[0]["candidates"] == records[0]["candidates"] and again[1] == records[1]
    with pytest.raises(ValueError, match="chosen"):
        record_choice(path, id_a, 2)
    with pytest.raises(KeyError):
        record_choice(path, "no-such-id", 0)
    assert read_jsonl(path)[0]["chosen"] == 1                           # failed calls changed nothing


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    append_jsonl(path, "p", [cand("a"), cand("b")], chosen=0)
    with open(path, "a") as f:
        f.write("\n")
        f.write(json.dumps({"prompt": "p", "candidates": [], "chosen": None}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl:3: 'candidates'"):
        read_jsonl(path)
    path.write_text('{"prompt": "p",\n')
    with pytest.raises(ValueError, match=r"d.jsonl:1: not valid JSON"):
        read_jsonl(path)


# ---------------------------------------------------------------------------------------------
# Learning: users prefer the candidate that repeats the prompt's keyword; LM score never picks it
# ---------------------------------------------------------------------------------------------

KEYWORDS = ("ocean guitar volcano bicycle coffee library elephant rainbow chess bread satellite garden piano "
            "desert hospital football mountain computer spider winter castle river camera tiger pizza airplane "
            "forest diamond planet kitchen violin snow bridge dolphin museum tomato robot train honey candle").split()
PROMPTS = ("Tell me something about the {kw}.", "Write one sentence about the {kw}.",
           "What is interesting about the {kw}?", "Describe the {kw} briefly.")
ANSWERS = ("The {kw} is old and quiet.", "I think the {kw} looks bright today.",
           "Many people say the {kw} feels warm.", "Every {kw} I have seen was small and strange.")


def synthetic_beams(num_prompts: int, seed: int) -> list[tuple[str, list[dict], int]]:
    """(prompt, candidates, chosen): 4-6 candidates, one about the prompt's keyword (the chosen one),
    the others about other keywords; LM scores random, but the chosen one is never the LM's best."""
    rng = random.Random(seed)
    out = []
    for _ in range(num_prompts):
        kw = rng.choice(KEYWORDS)
        k = rng.randint(4, 6)
        chosen = rng.randrange(k)
        words = rng.sample([w for w in KEYWORDS if w != kw], k - 1)
        words.insert(chosen, kw)
        scores = [rng.uniform(-2.0, -0.3) for _ in range(k)]
        if max(range(k), key=scores.__getitem__) == chosen:             # the LM's favourite is never chosen
            j = (chosen + 1) % k
            scores[chosen], scores[j] = scores[j], scores[chosen]
        cands = []
        for w, lm in zip(words, scores):
            text = rng.choice(ANSWERS).format(kw=w)
            n = len(text.split()) + rng.randint(1, 4)
            cands.append({"text": text, "token_ids": list(range(n)), "lm_score": lm, "logprob_sum": lm * n,
                          "num_tokens": n})
        out.append((rng.choice(PROMPTS).format(kw=kw), cands, chosen))
    return out


@pytest.fixture(scope="module")
def preference_jsonl(tmp_path_factory, reranker):
    """200 beam searches ranked by the shipped head and exported with the users' choices."""
    beams = synthetic_beams(200, seed=1)
    feats = reranker.features_many([p for p, _, _ in beams], [c for _, c, _ in beams])
    path = tmp_path_factory.mktemp("rerank") / "prefs.jsonl"
    for (prompt, cands, chosen), fs in zip(beams, feats):
        scored = [{**c, "features": f, "rerank_score": reranker.weights.score(f)} for c, f in zip(cands, fs)]
        append_jsonl(path, prompt, scored, chosen=chosen)
    return path


def test_finetune_learns_the_preference(preference_jsonl):
    records = read_jsonl(preference_jsonl)
    weights, metrics = finetune(records, val_fraction=0.25, seed=0)
    val = metrics["validation"]
    print(f"\nvalidation ({val['num_records']} records): LM top-1 {val['lm']['top1']:.3f} MRR {val['lm']['mrr']:.3f}; "
          f"reranker top-1 {val['reranker']['top1']:.3f} MRR {val['reranker']['mrr']:.3f}; weights {weights['weights']}")
    assert metrics["num_train"] == 150 and val["num_records"] == 50
    assert val["lm"]["top1"] == 0.0                                     # by construction
    assert val["reranker"]["top1"] >= val["lm"]["top1"] + 0.5
    assert val["reranker"]["mrr"] >= val["lm"]["mrr"] + 0.25
    w = dict(zip(weights["features"], weights["weights"]))
    assert w["relevance"] > 0 and abs(w["relevance"]) == max(abs(v) for v in w.values())
    # the shipped hand-set head does not already know the rule
    shipped = evaluate(records, HAND_SET)
    assert evaluate(records, weights)["reranker"]["top1"] >= shipped["reranker"]["top1"] + 0.25
    # deterministic by seed
    assert finetune(records, seed=0)[0] == weights
    assert split(records, 0.25, 0)[1] != split(records, 0.25, 1)[1]


def test_cli_finetune_then_eval(preference_jsonl, tmp_path, capsys):
    out = tmp_path / "head.json"
    assert rerank_cli.main(["rerank-finetune", str(preference_jsonl), "--out", str(out), "--seed", "0"]) == 0
    printed = capsys.readouterr().out
    assert "lm-score" in printed and "reranker" in printed and f"wrote {out}" in printed
    head = RerankWeights.load(out)
    assert "validation top-1" in head.comment

    assert rerank_cli.main(["rerank-eval", str(preference_jsonl), "--weights", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in printed.splitlines()[2:]}
    expected = evaluate(read_jsonl(preference_jsonl), head)
    assert rows["lm-score"] == pytest.approx([expected["lm"]["top1"], expected["lm"]["mrr"]], abs=1e-3)
    assert rows["reranker"] == pytest.approx([expected["reranker"]["top1"], expected["reranker"]["mrr"]], abs=1e-3)
    assert rows["reranker"][0] >= rows["lm-score"][0] + 0.5


@pytest.mark.parametrize("command", ["rerank-eval", "rerank-finetune"])
def test_cli_bad_input_exits_2(tmp_path, capsys, command):
    cases = {"missing": None, "invalid": "{oops\n",
             "unlabelled": json.dumps({"prompt": "p", "candidates": [
                 {"text": "a", "token_ids": [], "lm_score": -1.0, "features": {}, "rerank_score": None}] * 2,
                 "chosen": None}) + "\n"}
    for name, content in cases.items():
        path = tmp_path / f"{name}.jsonl"
        if content is not None:
            path.write_text(content)
        assert rerank_cli.main([command, str(path)]) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"pagedecode {command}: error:") and "\n" not in err, err
    # labelled, but without features: a clear error, not a traceback
    path = tmp_path / "nofeat.jsonl"
    append_jsonl(path, "p", [cand("a"), cand("b")], chosen=0)
    append_jsonl(path, "q", [cand("c"), cand("d")], chosen=1)
    assert rerank_cli.main([command, str(path), *(["--weights", "config/reranker.json"] if command == "rerank-eval"
                                                   else ["--out", str(tmp_path / "o.json")])]) == 2
    assert "lacks features" in capsys.readouterr().err
