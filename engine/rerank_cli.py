"""The rerank-eval and rerank-finetune subcommands; engine/cli.py registers them with add_rerank_commands()."""
from __future__ import annotations

import argparse
import sys


def _cli_error():
    from engine.cli import CliError  # lazily: engine.cli imports this module
    return CliError


def _load_labelled(path: str) -> list[dict]:
    """The file's records, at least one labelled; bad input becomes a CliError."""
    from engine.rerank_data import labelled, read_jsonl
    try:
        records = read_jsonl(path)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise _cli_error()(str(exc)) from exc
    if not labelled(records):
        raise _cli_error()(f"{path}: no labelled records ({len(records)} records; need 'chosen' set "
                           "and two or more candidates)")
    return records


def metrics_table(metrics: dict) -> str:
    """LM score alone against the reranker: top-1 accuracy and MRR, one row each."""
    lines = [f"{'scorer':<10} {'top-1':>7} {'MRR':>7}"]
    for label, key in (("lm-score", "lm"), ("reranker", "reranker")):
        lines.append(f"{label:<10} {metrics[key]['top1']:>7.3f} {metrics[key]['mrr']:>7.3f}")
    return "\n".join(lines)


def cmd_rerank_eval(args) -> int:
    from engine.rerank_data import evaluate
    from engine.reranker import RerankWeights
    records = _load_labelled(args.data)
    try:
        weights = RerankWeights.load(args.weights)
        metrics = evaluate(records, weights)
    except (FileNotFoundError, ValueError) as exc:
        raise _cli_error()(str(exc)) from exc
    print(f"{args.data}: {metrics['num_records']} labelled records, weights {args.weights or 'config/reranker.json'}")
    print(metrics_table(metrics))
    return 0


def cmd_rerank_finetune(args) -> int:
    from engine.rerank_data import finetune
    from engine.reranker import DEFAULT_WEIGHTS_PATH, RerankWeights
    records = _load_labelled(args.data)
    try:
        weights, metrics = finetune(records, val_fraction=args.val_fraction, seed=args.seed,
                                    steps=args.steps, lr=args.lr, l2=args.l2)
        RerankWeights.from_dict(weights).save(args.out or DEFAULT_WEIGHTS_PATH)
    except (ValueError, OSError) as exc:
        raise _cli_error()(str(exc)) from exc
    print(f"trained on {metrics['num_train']} records ({metrics['num_pairs']} pairs), "
          f"validated on {metrics['num_val']}, seed {metrics['seed']}")
    print(metrics_table(metrics["validation"]))
    names = ", ".join(f"{n} {w:+.3f}" for n, w in zip(weights["features"], weights["weights"]))
    print(f"weights (standardized features): {names}")
    print(f"wrote {args.out or DEFAULT_WEIGHTS_PATH}")
    return 0


def add_rerank_commands(subparsers) -> None:
    """Register rerank-eval and rerank-finetune on an argparse subparsers object."""
    e = subparsers.add_parser("rerank-eval", help="top-1 accuracy and MRR of LM score alone and the reranker")
    e.add_argument("data", help="JSONL exported by beam searches, with users' choices")
    e.add_argument("--weights", default=None, help="reranker head (default: config/reranker.json)")
    e.set_defaults(func=cmd_rerank_eval)
    f = subparsers.add_parser("rerank-finetune", help="train the reranker's linear head on users' choices")
    f.add_argument("data", help="JSONL exported by beam searches, with users' choices")
    f.add_argument("--out", default=None, help="where to write the head (default: config/reranker.json)")
    f.add_argument("--val-fraction", type=float, default=0.25)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--steps", type=int, default=300)
    f.add_argument("--lr", type=float, default=0.05)
    f.add_argument("--l2", type=float, default=1e-3)
    f.set_defaults(func=cmd_rerank_finetune)


def main(argv: list[str] | None = None) -> int:
    """Only the rerank subcommands, with engine.cli's error convention (one line, exit status 2)."""
    ap = argparse.ArgumentParser(prog="pagedecode")
    add_rerank_commands(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except _cli_error() as exc:
        print(f"pagedecode {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
