"""Where does a served batch's K/V land in the pool? Block tables from the engine's own BlockManager.

A decode benchmark has to pick its block tables. A random permutation of the pool (gpu_attention.py's
default) is the worst case: every 16-token page of every sequence somewhere else. A fresh pool in order is
the best. This module produces what the engine's allocator actually hands out on a pool that has been
serving for a while:

1. churn: background requests (prompts of 16-2048 tokens, at most a quarter of the pool, 16-1024 generated,
   random tokens, prefix caching on, so finished blocks go to the LRU as in the server) are admitted,
   decoded a token a step and freed, until the pool has turned over `turnover` times;
2. the measured batch arrives: each of `batch` sequences gets a prompt of ctx / 2 tokens, prefilled in
   8192-token chunks, while the background keeps decoding, finishing and arriving in what room is left;
3. the batch decodes in lockstep up to ctx tokens; then its block tables are returned.

The pool has `headroom` more blocks than the batch needs. Run it alone for the layout statistics:

    python3 benchmarks/kv_layout.py [--batch 16 64] [--ctx 4096 16384]

Results: benchmarks/results_cuda.md session 11 (with a trial allocator that kept pages in 2 MB extents: it
cut the 2 MB-group changes of a sequence 5x and bought nothing measurable on the GPU, so it was not kept).
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.block_manager import BlockManager  # noqa: E402

PREFILL_CHUNK = 8192            # the CUDA backend's default prompt-token budget a step


class _Background:
    """Requests that come and go around the measured batch."""

    def __init__(self, bm: BlockManager, rng: random.Random, block_size: int):
        self.bm, self.rng, self.bs = bm, rng, block_size
        self.max_prompt = max(16, min(2048, bm.num_blocks * block_size // 4))   # small pools: smaller requests
        self.running: dict[int, list] = {}      # seq_id -> [tokens, tokens still to generate]
        self.next_id = 1 << 30
        self.appended = 0

    def step(self, room: int) -> None:
        """One engine step: every background sequence decodes a token; arrivals while > room blocks free."""
        for seq_id, (tokens, left) in list(self.running.items()):
            if left == 0 or not self.bm.can_append(seq_id):   # finished, or preempted for lack of room
                self.bm.mark_computed(seq_id, tokens, len(tokens))
                self.bm.free(seq_id)
                del self.running[seq_id]
                continue
            tokens.append(self.rng.randrange(50000))
            self.bm.append_slots(seq_id, len(tokens))
            self.running[seq_id][1] -= 1
            self.appended += 1
        while True:
            prompt = [self.rng.randrange(50000) for _ in range(self.rng.randint(16, self.max_prompt))]
            need = -(-len(prompt) // self.bs) + room
            if self.bm.num_free_blocks < need:
                break
            self.bm.allocate(self.next_id, prompt)
            self.bm.mark_computed(self.next_id, prompt, len(prompt))
            self.running[self.next_id] = [prompt, self.rng.randint(16, 1024)]
            self.next_id += 1
            self.appended += len(prompt)


def served_tables(batch: int, ctx: int, block_size: int = 16, headroom: float = 0.25, turnover: float = 2.0,
                  seed: int = 0) -> tuple[list[list[int]], int]:
    """(the batch's block tables, pool size in blocks) after the three phases in the module docstring."""
    rng = random.Random(seed)
    nblk = ctx // block_size
    num_blocks = int(batch * nblk * (1 + headroom))
    bm = BlockManager(num_blocks, block_size, True)
    bg = _Background(bm, rng, block_size)
    while bg.appended < turnover * num_blocks * block_size:          # 1. churn
        bg.step(room=0)
    reserve = batch * nblk                                           # blocks the batch will own at the end
    prompts = [[rng.randrange(50000) for _ in range(ctx // 2)] for _ in range(batch)]
    for i, prompt in enumerate(prompts):                             # 2. arrive and prefill, chunk by chunk
        done = 0
        while done < len(prompt):
            take = min(PREFILL_CHUNK, len(prompt) - done)
            while bm.num_free_blocks < -(-take // block_size) + 1:
                bg.step(room=reserve)                                # wait for background requests to leave
            if done == 0:
                bm.allocate(i, prompt, num_tokens=take)
            else:
                bm.append_slots(i, done + take)
            done += take
            bm.mark_computed(i, prompt, done)
            bg.step(room=reserve)
    for total in range(ctx // 2 + 1, ctx + 1):                       # 3. decode in lockstep
        for i in range(batch):
            while not bm.can_append(i):
                bg.step(room=reserve)
            bm.append_slots(i, total)
        bg.step(room=reserve)
    tables = [bm.get_block_table(i) for i in range(batch)]
    bm.check_invariants()
    return tables, num_blocks


def layout_stats(tables: list[list[int]], group_blocks: int) -> dict:
    """Mean runs of consecutive blocks and mean distinct groups of group_blocks touched, per sequence."""
    runs = [1 + sum(b != a + 1 for a, b in zip(t, t[1:])) for t in tables]
    groups = [len({b // group_blocks for b in t}) for t in tables]
    switches = [1 + sum(b // group_blocks != a // group_blocks for a, b in zip(t, t[1:])) for t in tables]
    n = len(tables[0])
    return {"blocks": n, "runs": sum(runs) / len(runs), "groups": sum(groups) / len(groups),
            "switches": sum(switches) / len(switches), "min_groups": -(-n // group_blocks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--ctx", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--group-blocks", type=int, default=64, help="2 MB of one Llama-3-8B layer's K: 64 pages")
    args = ap.parse_args()
    print("| batch | ctx | pages | blocks a seq | runs a seq | 2 MB groups a seq | group changes a seq"
          " (fewest possible) |")
    print("|---|---|---|---|---|---|---|")
    for b in args.batch:
        for ctx in args.ctx:
            nblk = ctx // 16
            perm = list(range(b * nblk))
            random.Random(0).shuffle(perm)
            layouts = [("scattered (gpu_attention default)", [perm[i * nblk:(i + 1) * nblk] for i in range(b)]),
                       ("served (free list + LRU)", served_tables(b, ctx)[0])]
            for name, tables in layouts:
                s = layout_stats(tables, args.group_blocks)
                print(f"| {b} | {ctx} | {name} | {s['blocks']} | {s['runs']:.1f} | {s['groups']:.1f} | "
                      f"{s['switches']:.1f} ({s['min_groups']}) |")


if __name__ == "__main__":
    main()
