"""The embedded SmolLM2 on the INT8 CPU backend against the float32 reference, teacher-forced."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import math

import pytest
import torch

from engine.backends.cpu_int8 import CpuInt8Backend
from engine.backends.torch_ref import TorchRefBackend
from engine.batch import Batch
from engine.model import LlamaModel, fuse_weights

# fixed licence texts that installed packages ship, concatenated in this order
TEXT_SOURCES = [("sniffio", "LICENSE.APACHE2"), ("mpmath", "LICENSE"), ("itsdangerous", "LICENSE.txt"),
                ("blinker", "LICENSE.txt")]
NUM_TOKENS = 2560
CHUNK = 512
BLOCK_SIZE = 16


def fixed_text() -> str:
    parts = []
    for dist_name, file_name in TEXT_SOURCES:
        dist = importlib.metadata.distribution(dist_name)
        path = next(f for f in dist.files or [] if f.name == file_name)
        parts.append(dist.locate_file(path).read_text(encoding="utf-8"))
    return "\n\n".join(parts)


def teacher_forced(model: LlamaModel, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked prefill through the paged cache; returns (argmax [N-1], nll [N-1]) of next-token predictions."""
    num_blocks = (len(ids) + BLOCK_SIZE - 1) // BLOCK_SIZE
    model.backend.allocate_kv_cache(num_blocks + 1, BLOCK_SIZE)
    table = list(range(1, num_blocks + 1))                       # block 0 unused: the table is not the identity
    top, nll = [], []
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start:start + CHUNK]
        batch = Batch.build([(chunk, start, table)], BLOCK_SIZE, [True])
        batch = dataclasses.replace(batch, logits_indices=torch.arange(len(chunk)))
        logits = model.forward(batch)                            # [len(chunk), vocab]
        targets = torch.tensor(ids[start + 1:start + 1 + len(chunk)])
        logits = logits[: len(targets)]
        top.append(logits.argmax(-1))
        nll.append(torch.nn.functional.cross_entropy(logits, targets, reduction="none"))
    return torch.cat(top), torch.cat(nll)


@pytest.mark.slow
def test_int8_agrees_with_fp32_on_2560_tokens():
    from engine.tokenizer import Tokenizer
    from engine.weights import load_model

    loaded = load_model()
    cfg = loaded.config
    ids = Tokenizer.load().encode(fixed_text())[:NUM_TOKENS]
    assert len(ids) == NUM_TOKENS
    fused = fuse_weights(loaded.tensors, cfg)
    results = {}
    for backend in (TorchRefBackend(cfg), CpuInt8Backend(cfg)):
        backend.load_weights(fused)
        results[backend.name] = teacher_forced(LlamaModel(cfg, backend), ids)
    (top_ref, nll_ref), (top_q, nll_q) = results["torch"], results["cpu-int8"]
    agreement = (top_ref == top_q).float().mean().item()
    ppl_ref, ppl_q = math.exp(nll_ref.mean().item()), math.exp(nll_q.mean().item())
    print(f"\nteacher-forced over {NUM_TOKENS} tokens: top-1 agreement {agreement:.4f}; "
          f"perplexity fp32 {ppl_ref:.4f}, int8 {ppl_q:.4f} ({(ppl_q / ppl_ref - 1) * 100:+.2f}%)")
    assert agreement >= 0.95
    assert abs(ppl_q / ppl_ref - 1) <= 0.03
