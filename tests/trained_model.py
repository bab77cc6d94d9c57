"""A confident model from random init: brief training on a synthetic language that needs attention.

The language lives on a random subset of `num_states` token ids. After `lag + 1` uniform tokens,
x[t + 1] = perms[classes[x[t - lag]]][x[t]]: the token `lag` back picks which of `num_classes` fixed random
permutations maps the current token to the next, so a bigram model is left guessing among `num_classes`
candidates and only attention reaches the rule. With probability `noise` the next token is uniform
instead, which keeps the data diverse and puts the loss floor above zero; a model that has learned the
rule puts its argmax on the rule's token by a logit margin of about log((1 - noise) * num_states / noise).
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class SyntheticLanguage:
    token_ids: torch.Tensor     # [num_states] vocabulary ids of the states
    classes: torch.Tensor       # [num_states] selector class of each state
    perms: torch.Tensor         # [num_classes, num_states] next state for (class, current state)
    lag: int
    noise: float

    def sample(self, num_seqs: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        """[num_seqs, seq_len] token ids (CPU, int64)."""
        n = len(self.token_ids)
        states = torch.randint(0, n, (num_seqs, seq_len), generator=generator)    # the uniform draws
        is_noise = torch.rand(num_seqs, seq_len, generator=generator) < self.noise
        for t in range(self.lag + 1, seq_len):
            ruled = self.perms[self.classes[states[:, t - 1 - self.lag]], states[:, t - 1]]
            states[:, t] = torch.where(is_noise[:, t], states[:, t], ruled)
        return self.token_ids[states]

    def prompts(self, lens: list[int], seed: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        return [self.sample(1, n, g)[0].tolist() for n in lens]

    def loss_floors(self) -> tuple[float, float]:
        """Cross-entropy (nats) per ruled token of the true process, and of the best bigram model."""
        n, c, p = len(self.token_ids), self.perms.shape[0], self.noise
        rest = -p * (1 - 1 / n) * math.log(p / n)                # the noise mass off the predicted tokens
        top = 1 - p + p / n
        guess = (1 - p) / c + p / n                              # bigram: one of c candidates (if distinct)
        rest_bigram = -(n - c) * (p / n) * math.log(p / n)
        return -top * math.log(top) + rest, -c * guess * math.log(guess) + rest_bigram


def make_language(vocab_size: int, seed: int, num_states: int = 256, num_classes: int = 4, lag: int = 3,
                  noise: float = 0.1) -> SyntheticLanguage:
    g = torch.Generator().manual_seed(seed)
    token_ids = torch.randperm(vocab_size, generator=g)[:num_states]
    classes = torch.randperm(num_states, generator=g) % num_classes
    perms = torch.stack([torch.randperm(num_states, generator=g) for _ in range(num_classes)])
    return SyntheticLanguage(token_ids, classes, perms, lag, noise)


def lr_scale(step: int, steps: int) -> float:
    """Linear warm-up over the first tenth, then cosine decay from 1 to 0.1."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_synthetic(model, steps: int, device: str | torch.device, seed: int, batch_size: int = 16,
                    seq_len: int = 320, lr: float = 1e-3, log_every: int = 50) -> dict:
    """Train an HF LlamaForCausalLM in place on make_language(vocab, seed); round weights to bf16 values.

    AdamW with linear warm-up and cosine decay to lr / 10, bf16 autocast on CUDA (float32 elsewhere).
    The loss counts only ruled tokens. Returns the mean loss of the last `log_every` steps, the curve of
    such means [(step, loss)], the loss floors (true process, best bigram), steps, tokens and seconds."""
    device = torch.device(device)
    lang = make_language(model.config.vocab_size, seed)
    g = torch.Generator().manual_seed(seed + 1)
    data = lang.sample(steps * batch_size, seq_len, g).view(steps, batch_size, seq_len).to(device)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_scale(i, steps))
    window, losses, start = torch.zeros((), device=device), [], time.perf_counter()
    for i in range(steps):
        ids = data[i]                                                           # [B, L]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=ids, use_cache=False).logits                # [B, L, vocab]
        loss = F.cross_entropy(logits[:, lang.lag:-1].flatten(0, 1).float(), ids[:, lang.lag + 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        window += loss.detach()
        if (i + 1) % log_every == 0 or i == steps - 1:                         # mean loss of the window
            losses.append((i + 1, window.item() / (i % log_every + 1)))
            window.zero_()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        for param in model.parameters():                # exactly representable in bf16 (and so in fp16)
            param.copy_(param.bfloat16().float())
    floor, bigram = lang.loss_floors()
    return {"loss": losses[-1][1], "losses": losses, "floor": floor, "bigram_floor": bigram,
            "steps": steps, "tokens": steps * batch_size * seq_len, "seconds": seconds}
