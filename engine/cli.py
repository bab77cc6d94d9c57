"""pagedecode's command line: serve, generate, chat, batch, convert, bench (and rerank-* later)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EXIT_USAGE = 2


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="GGUF file, HF folder or our weights/ layout (default: embedded SmolLM2)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "cpu-int8", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--kv-cache-mb", type=float, default=None,
                   help="KV cache size (default: the config file's, else CPU 256 MB, CUDA 90%% of the GPU less weights)")
    p.add_argument("--config", default=None, help="runtime config YAML (default: config/runtime_config.yaml)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_params(args):
    from engine.sequence import SamplingParams
    try:
        return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                              seed=args.seed, stop=tuple(args.stop))
    except ValueError as exc:
        raise CliError(str(exc)) from exc


def build_decoder(args):
    """A Decoder configured from the runtime config file, then the command-line flags."""
    from engine.config import EngineConfig, load_runtime_config, load_file, CONFIG_DIR
    from engine.decoder import Decoder
    try:
        runtime = load_runtime_config(args.config)
        engine_opts = dict(runtime.get("engine") or {})
        engine_opts["backend"] = args.backend
        if args.threads:
            engine_opts["num_threads"] = args.threads
        if args.kv_cache_mb:
            engine_opts["kv_cache_mb"] = args.kv_cache_mb
        # One terminal user meets a few step shapes: capture their graphs as they come (~30 ms each) rather
        # than the server's whole set at start-up (~5 s with SmolLM2 on an H200).
        engine_opts["warmup"] = False
        overrides_file = CONFIG_DIR / "model_config.yaml"
        overrides = load_file(overrides_file) if overrides_file.exists() else {}
        model = args.model or (runtime.get("model") or {}).get("path")
        return Decoder(model, EngineConfig.from_dict(engine_opts), model_overrides=overrides or None)
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from exc


def beam_params(args):
    from engine.beam import BeamParams
    try:
        return BeamParams(beam_width=args.beams, max_tokens=args.max_tokens, length_penalty=args.length_penalty)
    except ValueError as exc:
        raise CliError(str(exc)) from exc


def cmd_beam(args, dec) -> int:
    """generate --beams W: print the candidates with their scores (reranked with --rerank)."""
    res = dec.beam_search(args.prompt, beam_params(args))
    cands = res.beams or []
    if args.rerank or args.export:
        from engine.reranker import Reranker
        cands = Reranker.load().rank(args.prompt, cands)
    if args.export:
        from engine.rerank_data import append_jsonl
        append_jsonl(args.export, args.prompt, cands)
    if args.json:
        print(json.dumps({"candidates": cands, "finish_reason": res.finish_reason}))
        return 0
    for i, cand in enumerate(cands):
        extra = f"  rerank {cand['rerank_score']:+.3f}" if "rerank_score" in cand else ""
        print(f"[{i}] score {cand['score']:.4f}{extra}\n{cand['text']}\n")
    return 0


def cmd_generate(args) -> int:
    if args.beams < 1:
        raise CliError("--beams must be >= 1")
    if (args.rerank or args.export) and args.beams == 1:
        raise CliError("--rerank and --export need --beams > 1")
    params = sampling_params(args)
    dec = build_decoder(args)
    try:
        if args.beams > 1:
            return cmd_beam(args, dec)
        if args.stream and not args.json:
            for delta in dec.stream(args.prompt, params):
                print(delta, end="", flush=True)
            print()
            return 0
        res = dec.generate(args.prompt, params)
        if args.json:
            print(json.dumps({"text": res.text, "token_ids": res.token_ids, "finish_reason": res.finish_reason,
                              "usage": {"prompt_tokens": res.num_prompt_tokens,
                                        "completion_tokens": res.num_generated_tokens}}))
        else:
            print(res.text)
        return 0
    finally:
        dec.close()


def cmd_batch(args) -> int:
    params = sampling_params(args)
    path = Path(args.file)
    if not path.exists():
        raise CliError(f"{path}: no such file")
    prompts = [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise CliError(f"{path}: no prompts (one per line)")
    dec = build_decoder(args)
    try:
        start = time.perf_counter()
        results = dec.generate(prompts, params)
        elapsed = time.perf_counter() - start
        for prompt, res in zip(prompts, results):
            print(json.dumps({"prompt": prompt, "text": res.text, "finish_reason": res.finish_reason}))
        total = sum(r.num_generated_tokens for r in results)
        print(f"# {len(results)} prompts, {total} tokens in {elapsed:.2f} s ({total / elapsed:.1f} tok/s)",
              file=sys.stderr)
        return 0
    finally:
        dec.close()


def cmd_chat(args) -> int:
    """Interactive terminal chat; earlier turns stay in the prefix cache. /reset clears, /quit leaves."""
    params = sampling_params(args)
    print("loading the model ...", file=sys.stderr)
    dec = build_decoder(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print(f"pagedecode chat ({dec.engine.backend.name} backend). /reset clears, /quit or Ctrl-D leaves.",
          file=sys.stderr)
    try:
        while True:
            try:
                line = input("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if line in ("/quit", "/exit"):
                return 0
            if line == "/reset":
                messages = messages[:1] if args.system else []
                continue
            if not line:
                continue
            messages.append({"role": "user", "content": line})
            print("bot> ", end="", flush=True)
            parts, start = [], time.perf_counter()
            try:
                for delta in dec.stream(params=params, messages=messages):
                    parts.append(delta)
                    print(delta, end="", flush=True)
            except KeyboardInterrupt:
                print(" [stopped]", end="")
            elapsed = time.perf_counter() - start
            print(f"\n    [{len(dec.tokenizer.encode(''.join(parts)))} tokens, {elapsed:.2f} s]", file=sys.stderr)
            messages.append({"role": "assistant", "content": "".join(parts)})
    finally:
        dec.close()


def cmd_convert(args) -> int:
    from engine.weights import convert
    try:
        convert(args.src or None, args.dst, int8=args.int8, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from exc
    print(f"wrote {args.dst}")
    return 0


def cmd_serve(args) -> int:
    from webapp.serve import serve  # the web app owns this
    return serve(args)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pagedecode", description="Paged-KV-cache LLM inference")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="complete one prompt")
    g.add_argument("prompt")
    g.add_argument("--stream", action="store_true")
    g.add_argument("--json", action="store_true")
    g.add_argument("--beams", type=int, default=1, help="beam width (>1: beam search)")
    g.add_argument("--length-penalty", type=float, default=1.0)
    g.add_argument("--rerank", action="store_true", help="rerank the beam candidates")
    g.add_argument("--export", default=None, help="append the candidates to this JSONL file")
    add_model_args(g)
    add_sampling_args(g)
    g.set_defaults(func=cmd_generate)
    b = sub.add_parser("batch", help="complete every line of a file, concurrently")
    b.add_argument("file")
    add_model_args(b)
    add_sampling_args(b)
    b.set_defaults(func=cmd_batch)
    c = sub.add_parser("chat", help="interactive terminal chat")
    c.add_argument("--system", default=None)
    add_model_args(c)
    add_sampling_args(c)
    c.set_defaults(func=cmd_chat)
    v = sub.add_parser("convert", help="write our weights/ layout from a GGUF, HF folder or layout")
    v.add_argument("dst")
    v.add_argument("--src", default=None, help="source (default: embedded SmolLM2 GGUF)")
    v.add_argument("--int8", action="store_true", help="also write int8/ quantized tensors")
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(func=cmd_convert)
    s = sub.add_parser("serve", help="serve the web app and the OpenAI-compatible API")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    add_model_args(s)
    s.set_defaults(func=cmd_serve)
    from engine.rerank_cli import add_rerank_commands
    add_rerank_commands(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"pagedecode {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
