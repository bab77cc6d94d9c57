"""Requests' sequences, their status, and SamplingParams (validated with errors naming the field)."""
from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"          # a stop token or stop string
    LENGTH = "length"      # max_tokens or the model's context
    ABORT = "abort"        # cancelled by the caller


def _check_number(name: str, value, low: float | None = None, high: float | None = None,
                  low_open: bool = False, high_open: bool = False, integer: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    if integer and not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy."""

    max_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0                    # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None       # top-n logprobs per generated token
    min_tokens: int = 0

    def __post_init__(self) -> None:
        _check_number("max_tokens", self.max_tokens, low=1, integer=True)
        _check_number("temperature", self.temperature, low=0.0)
        _check_number("top_k", self.top_k, low=0, integer=True)
        _check_number("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        _check_number("min_p", self.min_p, low=0.0, high=1.0)
        _check_number("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        _check_number("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        _check_number("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        _check_number("min_tokens", self.min_tokens, low=0, integer=True)
        if self.seed is not None:
            _check_number("seed", self.seed, low=0, high=2**63 - 1, integer=True)
        if self.logprobs is not None:
            _check_number("logprobs", self.logprobs, low=0, high=20, integer=True)
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        for t in self.stop_token_ids:
            _check_number("stop_token_ids", t, low=0, integer=True)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(eq=False)
class Sequence:
    """One stream of tokens: the prompt plus what was generated, and where it stands.

    Compared by identity: two sequences with equal fields are still two sequences (and the
    scheduler's membership checks stay O(1) per comparison)."""

    seq_id: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed: int = 0             # tokens whose KV is in the cache
    num_cached_prefix: int = 0        # of those, served from the prefix cache at admission
    finish_reason: FinishReason | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    num_preemptions: int = 0
    logprobs: list = field(default_factory=list)
    group: list | None = None         # a beam request's live sequences (preempted together)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        return self.num_uncomputed > 1
