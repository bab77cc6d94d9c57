"""The app's one long-lived object (app.extensions["pagedecode"]): the Engine, built on a thread so
/health can answer 503 meanwhile, plus admission limits and metrics. Routes start a Generation
here and never touch blocks or the scheduler.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from webapp.metrics import Metrics
from webapp.schema import ApiError

log = logging.getLogger("pagedecode.webapp")


@dataclass(frozen=True)
class Limits:
    max_concurrent_requests: int | None = None  # None: CONCURRENT_PER_SEQ x the engine's max_num_seqs
    max_queue_length: int = 256
    max_prompt_tokens: int = 4096
    queue_timeout_s: float = 300.0


# Generations admitted a sequence slot of the engine when max_concurrent_requests is not set: the engine
# runs max_num_seqs at once and keeps as many queued (CPU 32 -> 64, as before; CUDA 128 -> 256).
CONCURRENT_PER_SEQ = 2
FALLBACK_CONCURRENT = 64            # an engine that does not say its max_num_seqs


def concurrent_for(engine) -> int:
    """max_concurrent_requests when it is not set: CONCURRENT_PER_SEQ x the engine's max_num_seqs."""
    seqs = getattr(getattr(engine, "config", None), "max_num_seqs", None)
    return CONCURRENT_PER_SEQ * seqs if isinstance(seqs, int) and seqs > 0 else FALLBACK_CONCURRENT


class Admission:
    """At most max_running generations at once; up to max_waiting more wait; past that, 429."""

    def __init__(self, max_running: int, max_waiting: int, timeout_s: float):
        self.max_running, self.max_waiting, self.timeout_s = max_running, max_waiting, timeout_s
        self.num_running = 0
        self.num_waiting = 0
        self._cond = threading.Condition()

    def acquire(self, n: int = 1) -> None:
        """Take n slots at once (a batch), waiting in line if the queue has room; else 429."""
        if n > self.max_running:
            raise ApiError(f"{n} prompts exceed max_concurrent_requests ({self.max_running})", param="prompts")
        with self._cond:
            if self.num_running + n > self.max_running:
                if self.num_waiting >= self.max_waiting:
                    raise ApiError(f"server busy: {self.num_running} requests running and {self.num_waiting} "
                                   f"queued (limits {self.max_running} and {self.max_waiting}); retry later",
                                   status=429, type="rate_limit_error")
                self.num_waiting += 1
                try:
                    if not self._cond.wait_for(lambda: self.num_running + n <= self.max_running, self.timeout_s):
                        raise ApiError("server busy: timed out waiting for a free slot", status=429,
                                       type="rate_limit_error")
                finally:
                    self.num_waiting -= 1
            self.num_running += n

    def release(self) -> None:
        with self._cond:
            self.num_running -= 1
            self._cond.notify_all()

    def set_max_running(self, n: int) -> None:
        """A new limit (a model loaded in the background decides it); waiters that now fit go ahead."""
        with self._cond:
            self.max_running = n
            self._cond.notify_all()


class Runtime:
    """The Engine (given, or built by `factory` on a background thread), limits and metrics."""

    def __init__(self, limits: Limits, engine=None, model_name: str | None = None, reranker_factory=None):
        self.limits = limits
        running = limits.max_concurrent_requests or concurrent_for(engine)   # a loading engine: set once loaded
        self.admission = Admission(running, limits.max_queue_length, limits.queue_timeout_s)
        self.metrics = Metrics(self.engine_stats, self.admission)
        self.model_name = model_name or ("pagedecode" if engine is not None else None)
        self.created = int(time.time())
        self.load_error: str | None = None
        self._engine = engine
        self._closer: Callable[[], None] | None = None
        self._tokenize_lock = threading.Lock()
        self._reranker_factory = reranker_factory  # () -> Reranker; None: engine.reranker.Reranker.load
        self._reranker = None
        self._reranker_lock = threading.Lock()
        self._reranker_warming = False

    # ---- loading -----------------------------------------------------------------------------
    def load_in_background(self, factory: Callable[[], tuple]) -> threading.Thread:
        """Run factory() -> (engine, model_name, close) on a thread; /health says 503 until done."""
        def run():
            started = time.monotonic()
            try:
                engine, name, closer = factory()
            except Exception as exc:  # noqa: BLE001 - reported by /health, logged with its traceback
                log.exception("loading the model failed")
                self.load_error = f"{type(exc).__name__}: {exc}"
                return
            self.model_name, self._closer = self.model_name or name or "pagedecode", closer
            if self.limits.max_concurrent_requests is None:
                self.admission.set_max_running(concurrent_for(engine))
            self._engine = engine
            log.info("model %s ready on backend %s in %.1f s", self.model_name,
                     engine.stats().get("backend"), time.monotonic() - started)
        thread = threading.Thread(target=run, name="pagedecode-load", daemon=True)
        thread.start()
        return thread

    @property
    def state(self) -> str:
        return "ready" if self._engine is not None else ("error" if self.load_error else "loading")

    @property
    def engine(self):
        if self._engine is None:
            if self.load_error:
                raise ApiError(f"the model failed to load: {self.load_error}", status=503, type="server_error")
            raise ApiError("the model is still loading; retry shortly (GET /health says when)", status=503,
                           type="server_error")
        return self._engine

    def engine_stats(self) -> dict:
        return self._engine.stats() if self._engine is not None else {}

    def close(self) -> None:
        if self._closer is not None:
            self._closer()

    # ---- the beam reranker -------------------------------------------------------------------
    def reranker(self):
        """The one Reranker of this app; built on first use (its MiniLM encoder loads on first rank)."""
        with self._reranker_lock:
            if self._reranker is None:
                if self._reranker_factory is not None:
                    self._reranker = self._reranker_factory()
                else:
                    from engine.reranker import Reranker
                    self._reranker = Reranker.load()
            return self._reranker

    def warm_reranker(self) -> None:
        """Load the encoder on a thread of its own (once) while the first beam search runs."""
        with self._reranker_lock:
            if self._reranker_warming:
                return
            self._reranker_warming = True

        def warm():
            try:
                rr = self.reranker()
                if hasattr(rr, "embed"):
                    rr.embed(["warm up"])
            except Exception:  # noqa: BLE001 - reported when a search finishes and ranking fails
                log.exception("loading the reranker failed")
        threading.Thread(target=warm, name="pagedecode-reranker", daemon=True).start()

    # ---- requests ----------------------------------------------------------------------------
    def prompt_ids(self, prompt, messages) -> list[int]:
        """Tokenize once at the edge and check the prompt limits (400 naming the field)."""
        engine = self.engine
        field = "messages" if messages is not None else "prompt"
        if isinstance(prompt, list):
            ids = prompt
        elif engine.tokenizer is None:
            raise ApiError("this model has no tokenizer: send prompt as a list of token ids", param=field)
        else:
            try:
                with self._tokenize_lock:
                    ids = (engine.tokenizer.apply_chat_template(messages) if messages is not None
                           else engine.tokenizer.encode(prompt))
            except ValueError as exc:
                raise ApiError(f"{field}: {exc}", param=field) from None
        limit = min(self.limits.max_prompt_tokens, engine.max_model_len - 1)
        if len(ids) > limit:
            raise ApiError(f"the prompt has {len(ids)} tokens; at most {limit} are allowed "
                           f"(context {engine.max_model_len}, max_prompt_tokens {self.limits.max_prompt_tokens})",
                           param=field)
        return list(ids)

    def start(self, prompt, messages, params) -> "Generation":
        """Tokenize, admit (or 429) and submit one request."""
        return self.start_many([(prompt, messages, params)])[0]

    def start_many(self, requests: list[tuple]) -> list["Generation"]:
        """Tokenize all, admit all at once (or 429), submit each; [(prompt, messages, params)]."""
        engine = self.engine
        ids = [self.prompt_ids(prompt, messages) for prompt, messages, _ in requests]
        self.admission.acquire(len(requests))
        gens: list[Generation] = []
        try:
            for prompt_ids, (_, _, params) in zip(ids, requests):
                gens.append(Generation(self, engine.submit(prompt_ids, params), len(prompt_ids)))
        except BaseException as exc:
            for gen in gens:
                gen.close()
            for _ in range(len(requests) - len(gens)):
                self.admission.release()
            if isinstance(exc, ValueError):
                raise ApiError(str(exc), param="prompt") from None
            raise
        return gens


class Generation:
    """One admitted request: its outputs with latency metrics, and an idempotent close() that
    aborts it if unfinished and gives back its admission slot."""

    def __init__(self, runtime: Runtime, handle, num_prompt_tokens: int):
        self.runtime, self.handle, self.num_prompt_tokens = runtime, handle, num_prompt_tokens
        self.request_id = handle.request_id
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.num_tokens = 0
        self.finished = False
        self._closed = False
        self._close_lock = threading.Lock()

    def outputs(self, poll_s: float | None = None) -> Iterator:
        """Yield RequestOutputs until the final one; with poll_s, yield None after each quiet poll_s
        (a chance to send a keep-alive or read the client)."""
        from engine.request import RequestError  # here, so importing webapp does not load torch
        while not self.finished:
            try:
                out = self.handle.get(timeout=poll_s)
            except queue.Empty:
                yield None
                continue
            except RequestError as exc:
                self.finished = True
                raise ApiError(f"the engine failed: {exc}", status=500, type="server_error") from None
            self._observe(out)
            if out.finished:
                self.finished = True
            yield out

    def _observe(self, out) -> None:
        n = len(out.token_ids)
        if not n:
            return
        now = time.monotonic()
        metrics = self.runtime.metrics
        if self.first_token_at is None:
            self.first_token_at = now
            metrics.ttft.observe(now - self.submitted)
            n -= 1
        elif self.last_token_at is not None:
            for _ in range(n):
                metrics.itl.observe((now - self.last_token_at) / n)
        self.last_token_at = now
        self.num_tokens += len(out.token_ids)

    def timing(self) -> dict:
        """Time to first token and decode speed, as shown under each answer."""
        ttft = None if self.first_token_at is None else self.first_token_at - self.submitted
        rate = None
        if self.first_token_at is not None and self.num_tokens > 1 and self.last_token_at > self.first_token_at:
            rate = (self.num_tokens - 1) / (self.last_token_at - self.first_token_at)
        return {"ttft_s": ttft, "tokens_per_s": rate, "total_s": time.monotonic() - self.submitted}

    def collect(self):
        """Run to the end; the request's engine.request.Completion (text, token_ids, finish_reason, usage)."""
        from engine.request import gather  # here, so importing webapp does not load torch
        return gather(self.handle.request_id, self.outputs())

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if not self.finished:
            self.handle.cancel()
            self.runtime.metrics.aborted.inc()
        self.runtime.admission.release()
