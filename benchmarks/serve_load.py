"""Load test: N concurrent streaming chat clients against gunicorn on loopback for a fixed time.

    .venv/bin/python benchmarks/serve_load.py                 # starts `pagedecode serve` on a free port
    .venv/bin/python benchmarks/serve_load.py --url http://127.0.0.1:8000   # an already running server

Each client loops: POST /stream with a chat (SSE), timing the first delta (TTFT) and the gaps
between deltas (inter-token latency, per token), until the duration is over; requests still
running then are finished, not cut. Prints TTFT and ITL p50/p99, total tokens/s and errors.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "Give me five ideas for a rainy weekend.",
    "What are the benefits of reading every day?",
    "Describe the water cycle to a ten year old.",
    "Write a poem about autumn leaves.",
    "How do I make a good cup of tea?",
    "List some tips for learning a new language.",
]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


class Stats:
    def __init__(self):
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.tokens = 0
        self.requests = 0
        self.errors: list[str] = []


async def one_request(client: httpx.AsyncClient, body: dict, stats: Stats) -> None:
    start = time.perf_counter()
    last = None
    done = None
    try:
        async with client.stream("POST", "/stream", json=body) as response:
            if response.status_code != 200:
                stats.errors.append(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                now = time.perf_counter()
                if event["type"] == "delta" and event["token_ids"]:
                    if last is None:
                        stats.ttft.append(now - start)
                    else:
                        gap = (now - last) / len(event["token_ids"])
                        stats.itl.extend([gap] * len(event["token_ids"]))
                    last = now
                elif event["type"] == "done":
                    done = event
                elif event["type"] == "error":
                    stats.errors.append(f"error event: {event['error']['message']}")
                    return
    except httpx.HTTPError as exc:
        stats.errors.append(f"{type(exc).__name__}: {exc}")
        return
    if done is None:
        stats.errors.append("stream ended without a done event")
        return
    stats.requests += 1
    stats.tokens += done["usage"]["completion_tokens"]


async def client_loop(i: int, base: str, headers: dict, deadline: float, args, stats: Stats) -> None:
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=httpx.Timeout(300.0)) as client:
        n = 0
        while time.perf_counter() < deadline:
            prompt = PROMPTS[(i + n) % len(PROMPTS)]
            body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
                    "temperature": 0.7, "top_p": 0.95, "seed": i * 1000 + n}
            await one_request(client, body, stats)
            n += 1


async def run_load(base: str, args) -> tuple[Stats, float]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    stats = Stats()
    start = time.perf_counter()
    deadline = start + args.duration
    await asyncio.gather(*(client_loop(i, base, headers, deadline, args, stats) for i in range(args.clients)))
    return stats, time.perf_counter() - start


def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--backend", args.backend]
    log = open(args.server_log, "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited ({proc.returncode}); see {args.server_log}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"the server never became healthy; see {args.server_log}")


def scrape(base: str, names: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        key, _, value = line.partition(" ")
        if key in names:
            out[key] = float(value)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="a running server (default: start one on loopback)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of new requests")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--api-key", default=os.environ.get("PAGEDECODE_API_KEY"))
    ap.add_argument("--server-log", default="/tmp/pagedecode_serve_load.log")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    if args.url and not args.url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        sys.exit("serve_load only targets loopback servers")

    proc = None
    base = args.url
    if base is None:
        proc, base = start_server(args)
    try:
        httpx.post(base + "/generate", json={"prompt": "warm up", "max_tokens": 4}, timeout=120,
                   headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else {})
        health = httpx.get(base + "/health", timeout=10).json()
        print(f"server {base}: model {health.get('model')}, backend {health.get('backend')}; "
              f"{args.clients} streaming clients for {args.duration:.0f} s, max_tokens {args.max_tokens}")
        stats, wall = asyncio.run(run_load(base, args))
        server = scrape(base, ("pagedecode_preemptions_total", "pagedecode_prefix_cache_hit_rate"))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)

    figures = {
        "clients": args.clients, "duration_s": round(wall, 1), "requests": stats.requests,
        "errors": len(stats.errors), "completion_tokens": stats.tokens,
        "tokens_per_s": round(stats.tokens / wall, 1),
        "ttft_p50_ms": round(1000 * percentile(stats.ttft, 50), 1),
        "ttft_p99_ms": round(1000 * percentile(stats.ttft, 99), 1),
        "itl_p50_ms": round(1000 * percentile(stats.itl, 50), 1),
        "itl_p99_ms": round(1000 * percentile(stats.itl, 99), 1),
        "preemptions": server.get("pagedecode_preemptions_total"),
        "prefix_cache_hit_rate": server.get("pagedecode_prefix_cache_hit_rate"),
    }
    print(f"requests {stats.requests}, errors {len(stats.errors)}, {stats.tokens} tokens in {wall:.1f} s")
    print(f"total throughput  {figures['tokens_per_s']:8.1f} tokens/s")
    print(f"TTFT  p50 {figures['ttft_p50_ms']:8.1f} ms   p99 {figures['ttft_p99_ms']:8.1f} ms")
    print(f"ITL   p50 {figures['itl_p50_ms']:8.1f} ms   p99 {figures['itl_p99_ms']:8.1f} ms")
    for err in stats.errors[:10]:
        print("error:", err)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 1 if stats.errors else 0


if __name__ == "__main__":
    sys.exit(main())
