"""Engine: submit/cancel, the step loop on its own thread, and per-request output queues."""
from __future__ import annotations

import dataclasses

import itertools
import logging
import queue
import threading
import time
import traceback

import torch

from engine.backends.base import Backend
from engine.batch import Batch
from engine.beam import BeamParams, BeamSearch
from engine.beam_request import BeamRequest, beam_sampling_params, fork_children
from engine.block_manager import BlockManager
from engine.config import EngineConfig, ModelConfig
from engine.model import LlamaModel
from engine.pipeline import PipelinedDecode, InflightStep
from engine.request import Request, RequestHandle, RequestOutput
from engine.sampler import SampleResult, Sampler, make_generator
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import FinishReason, SamplingParams, Sequence

log = logging.getLogger("pagedecode.engine")


class Engine(PipelinedDecode):
    """One model, one KV cache, one thread that owns the scheduler; callers talk through queues."""

    def __init__(self, model_config: ModelConfig, backend: Backend, config: EngineConfig | None = None,
                 tokenizer=None):
        self.config = config or EngineConfig()
        if self.config.max_batched_tokens is None:
            self.config = dataclasses.replace(self.config, max_batched_tokens=backend.default_max_batched_tokens)
        if self.config.max_num_seqs is None:
            self.config = dataclasses.replace(self.config, max_num_seqs=backend.default_max_num_seqs)
        self.model_config = model_config
        self.backend = backend
        self.tokenizer = tokenizer
        self.model = LlamaModel(model_config, backend)
        self.block_size = self.config.block_size
        # A backend serves one engine: an earlier engine's cache (and graphs) go before this one's is sized.
        backend.release_kv_cache()
        self.num_blocks = self.config.num_blocks
        if self.num_blocks is None:
            kv_bytes = int(self.config.kv_cache_mb * 2**20) if self.config.kv_cache_mb is not None else \
                backend.default_kv_cache_bytes(self.config.max_batched_tokens, self.config.max_num_seqs)
            self.num_blocks = max(2, kv_bytes // backend.kv_bytes_per_block(self.block_size))
        backend.allocate_kv_cache(self.num_blocks, self.block_size)
        self.max_model_len = min(self.config.max_model_len or model_config.max_position_embeddings,
                                 model_config.max_position_embeddings, self.num_blocks * self.block_size)
        # Captured now, not when a step of a new shape first comes: a CUDA graph capture costs about three
        # eager steps, 30-80 ms a shape with SmolLM2 on the H200 (benchmarks/gpu_serve.py).
        t0 = time.perf_counter()
        self.warmup_shapes = backend.warmup(self.config.max_num_seqs, self.config.max_batched_tokens,
                                            self.max_model_len) if self.config.warmup else 0
        self.warmup_s = time.perf_counter() - t0
        if self.warmup_shapes:
            log.info("warm-up: %d step shapes prepared in %.1f s", self.warmup_shapes, self.warmup_s)
        self.blocks = BlockManager(self.num_blocks, self.block_size, self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.config, self.blocks)
        self.sampler = Sampler(argmax=backend.argmax, sample=backend.sample)
        self.eos_token_ids = tuple(tokenizer.eos_token_ids) if tokenizer else tuple(model_config.eos_token_ids)
        self._requests: dict[str, Request] = {}
        self._inbox: queue.Queue = queue.Queue()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.counters = {"requests_finished": 0, "tokens_generated": 0, "prefill_tokens": 0,
                         "prefix_tokens_cached": 0, "steps": 0, "preemptions": 0, "steps_ahead": 0}
        # A decode step whose tokens are still on the device (backends with supports_async): the next
        # step is launched from them before the host reads them (see step()).
        self._inflight: InflightStep | None = None
        self._stats = self._snapshot()

    # ---- public, any thread -------------------------------------------------------------------
    def submit(self, prompt: str | list[int] | None = None, params: SamplingParams | None = None, *,
               messages: list[dict] | None = None, request_id: str | None = None) -> RequestHandle:
        """Tokenize and queue a request; returns the handle its outputs arrive on."""
        params = params or SamplingParams()
        prompt_ids = self._prompt_ids(prompt, messages)
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the context holds {self.max_model_len} "
                             f"(at least one must be left to generate)")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self._requests:
            raise ValueError(f"request_id {rid!r} is already running")
        handle = RequestHandle(rid, self)
        seq = Sequence(next(self._ids), rid, prompt_ids, params)
        detok = None
        if self.tokenizer is not None:
            from engine.tokenizer import IncrementalDetokenizer
            detok = IncrementalDetokenizer(self.tokenizer, prompt_ids)
        gen = make_generator(params.seed if params.seed is not None else self.config.seed * 1_000_003 + seq.seq_id)
        req = Request(rid, seq, params, handle, detok, gen, self.eos_token_ids)
        self._requests[rid] = req
        self._inbox.put(("add", req))
        return handle

    add_request = submit

    def submit_beam(self, prompt: str | list[int] | None = None, params: BeamParams | None = None, *,
                    messages: list[dict] | None = None, request_id: str | None = None) -> RequestHandle:
        """Queue a beam search; each step's tree nodes stream on the handle, the candidates come last."""
        params = params or BeamParams()
        prompt_ids = self._prompt_ids(prompt, messages)
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the context holds {self.max_model_len}")
        if params.max_tokens > room:
            params = BeamParams(**{**vars(params), "max_tokens": room})
        rid = request_id or f"beam-{next(self._ids)}"
        if rid in self._requests:
            raise ValueError(f"request_id {rid!r} is already running")
        handle = RequestHandle(rid, self)
        group: list[Sequence] = []
        seq = Sequence(next(self._ids), rid, prompt_ids, beam_sampling_params(params), group=group)
        group.append(seq)
        text = self.tokenizer.token_text if self.tokenizer is not None else None
        search = BeamSearch(params, self.eos_token_ids, text)
        self._requests[rid] = BeamRequest(rid, params, search, group, handle, self.tokenizer, prompt_ids)
        self._inbox.put(("add", self._requests[rid]))
        return handle

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks are freed on the engine thread's next step."""
        self._inbox.put(("abort", request_id))

    def stats(self) -> dict:
        """A consistent snapshot taken after the last step."""
        return dict(self._stats)

    def has_work(self) -> bool:
        return bool(self._requests) or not self._inbox.empty() or self._inflight is not None

    def start(self) -> "Engine":
        """Run step() on a background thread until stop()."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="pagedecode-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # ---- engine thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.scheduler.has_work() and self._inflight is None:
                try:
                    self._handle(self._inbox.get(timeout=0.5))
                except queue.Empty:
                    continue
            try:
                self.step()
            except Exception as exc:  # keep serving: fail what was running, free its blocks
                log.error("engine step failed: %s", traceback.format_exc())
                self._fail_all(f"engine error: {exc}")

    def _handle(self, msg) -> None:
        kind, payload = msg
        if kind == "add":
            for seq in (payload.seqs if isinstance(payload, BeamRequest) else [payload.seq]):
                self.scheduler.add(seq)
        elif kind == "abort":
            req = self._requests.get(payload)
            if isinstance(req, BeamRequest):
                self._finish_beam(req, FinishReason.ABORT)
            elif req is not None:
                self._finish(req, FinishReason.ABORT)

    @torch.inference_mode()
    def step(self) -> int:
        """Admit, schedule, run the model once, sample, and publish outputs. Returns tokens run.
        With a step in flight (engine/pipeline.py) the next one is launched from its device tokens first."""
        while True:
            try:
                self._handle(self._inbox.get_nowait())
            except queue.Empty:
                break
        if self._inflight is not None:
            prev, self._inflight = self._inflight, None
            ahead = self._launch_ahead(prev)
            self._read_inflight(prev)
            if ahead is not None:
                self._mark_ahead(ahead)
                self._inflight = ahead if any(not s.is_finished for s in ahead.rows) else None
                self._stats = self._snapshot()
                return len(ahead.rows)
        out = self.scheduler.schedule()
        self.counters["preemptions"] += len(out.preempted)
        if out.is_empty:
            self._stats = self._snapshot()
            return 0
        self.backend.copy_blocks(out.copies)
        batch = Batch.build([(it.seq.token_ids[it.seq.num_computed:it.seq.num_computed + it.num_new_tokens],
                              it.seq.num_computed, self.blocks.get_block_table(it.seq.seq_id))
                             for it in out.scheduled], self.block_size, [it.wants_logits for it in out.scheduled])
        logits = self.model.forward(batch)
        self._account(out)
        self.scheduler.mark_computed(out)
        rows = [it.seq for it in out.scheduled]
        if len(logits) == len(rows) and self._can_pipeline(rows):
            self._inflight = InflightStep(rows, *self._device_tokens(rows, logits))
        else:
            self._sample(out, logits)
        self.counters["steps"] += 1
        self._stats = self._snapshot()
        return batch.num_tokens

    def _account(self, out: SchedulerOutput) -> None:
        for it in out.scheduled:
            seq = it.seq
            if seq.num_computed < len(seq.prompt_ids):
                self.counters["prefill_tokens"] += it.num_new_tokens
            if seq.num_computed == seq.num_cached_prefix and seq.num_cached_prefix:
                self.counters["prefix_tokens_cached"] += seq.num_cached_prefix

    def _sample(self, out: SchedulerOutput, logits: torch.Tensor) -> None:
        rows = [it.seq for it in out.scheduled if it.wants_logits]
        beam_rows = [i for i, s in enumerate(rows) if s.group is not None]
        if beam_rows:
            self._beam_rows(rows, logits, beam_rows)
            keep = [i for i, s in enumerate(rows) if s.group is None]
            rows, logits = [rows[i] for i in keep], logits[keep]
        if not rows:
            return
        reqs = [self._requests[s.request_id] for s in rows]
        for i, req in enumerate(reqs):
            if len(req.seq.output_ids) < req.params.min_tokens and not req.params.ignore_eos:
                logits[i, list(self.eos_token_ids)] = float("-inf")
        results = self.sampler(logits, [r.params for r in reqs], [r.seq.prompt_ids for r in reqs],
                               [r.seq.output_ids for r in reqs], [r.generator for r in reqs])
        now = time.monotonic()
        for req, res in zip(reqs, results):
            self._publish(req, res, now)

    def _publish(self, req: Request, res: SampleResult, now: float) -> None:
        """A sampled token (and its logprobs, when asked) to its request."""
        if req.seq.first_token_time is None:
            req.seq.first_token_time = now
        if req.params.logprobs is not None:
            req.pending_logprobs.append({"token_id": res.token_id, "logprob": res.logprob,
                                         "top": res.top_logprobs or []})
        self._deliver(req, res.token_id)

    def _deliver(self, req: Request, token_id: int) -> None:
        """Append a sampled token; finish the request or send its update."""
        finish = req.add_token(token_id)
        self.counters["tokens_generated"] += 1
        if finish is None and req.seq.num_tokens >= self.max_model_len:
            finish = FinishReason.LENGTH
        if finish is not None:
            self._finish(req, finish)
        else:
            update = req.take_output(None)
            if update is not None:
                req.handle.put(update)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        self.scheduler.finish(req.seq, reason)
        if req.detok is not None and reason == FinishReason.LENGTH:
            req.text += req.detok.flush()
        req.handle.put(req.take_output(reason))
        self._requests.pop(req.request_id, None)
        self.counters["requests_finished"] += 1

    # ---- beam search -------------------------------------------------------------------------
    def _beam_rows(self, rows: list[Sequence], logits: torch.Tensor, indices: list[int]) -> None:
        ready = []
        for i in indices:
            req = self._requests[rows[i].request_id]
            if req.collect(rows[i], logits[i]) and req not in ready:
                ready.append(req)
        for req in ready:
            self._beam_step(req)

    def _beam_step(self, req: BeamRequest) -> None:
        """Advance one beam search: fork the parents that survive, free the ones that do not."""
        step = req.search.step(req.take_rows())
        self.counters["tokens_generated"] += len(step.kept)
        by_parent: dict[int, list] = {}
        for choice in step.kept:
            by_parent.setdefault(choice.parent_index, []).append(choice)
        next_seqs: dict[int, Sequence] = {}
        for index, parent in enumerate(req.seqs):
            choices = by_parent.get(index)
            if not choices:
                continue
            forks = fork_children(parent, len(choices), lambda: next(self._ids))
            for child in forks:
                self.blocks.fork(parent.seq_id, child.seq_id)
                self.scheduler.add_running(child, after=parent)
            for seq, choice in zip([parent, *forks], choices):
                seq.output_ids.append(choice.token_id)
                next_seqs[choice.node_id] = seq
        for index, parent in enumerate(req.seqs):
            if index not in by_parent:
                self.scheduler.finish(parent, FinishReason.STOP)
        req.seqs[:] = [next_seqs[c.node_id] for c in step.kept]
        used = {b for s in req.seqs for b in self.blocks.get_block_table(s.seq_id)}
        req.peak_blocks = max(req.peak_blocks, len(used))
        if step.done or any(s.num_tokens >= self.max_model_len for s in req.seqs):
            self._finish_beam(req, FinishReason.STOP if step.done else FinishReason.LENGTH)
        else:
            req.handle.put(req.step_output(step))

    def _finish_beam(self, req: BeamRequest, reason: FinishReason) -> None:
        for seq in list(req.seqs):
            self.scheduler.finish(seq, reason)
        req.handle.put(req.final_output(reason))
        self._requests.pop(req.request_id, None)
        self.counters["requests_finished"] += 1

    def _fail_all(self, message: str) -> None:
        self._inflight = None
        for req in list(self._requests.values()):
            for seq in (req.seqs if isinstance(req, BeamRequest) else [req.seq]):
                self.scheduler.finish(seq, FinishReason.ABORT)
            req.handle.put(RequestOutput(req.request_id, "", [], True, "error", error=message))
            self._requests.pop(req.request_id, None)
        self._stats = self._snapshot()

    # ---- helpers -----------------------------------------------------------------------------
    def _prompt_ids(self, prompt, messages) -> list[int]:
        if messages is not None:
            if self.tokenizer is None:
                raise ValueError("messages need a tokenizer")
            ids = self.tokenizer.apply_chat_template(messages)
        elif isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            vocab = self.model_config.vocab_size
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
                raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        else:
            raise ValueError("prompt must be a string or a list of token ids")
        if not ids:
            raise ValueError("prompt is empty")
        return ids

    def _snapshot(self) -> dict:
        bm = self.blocks.stats()
        return {"num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
                "num_blocks": self.num_blocks, "num_free_blocks": bm["num_free_blocks"],
                "num_used_blocks": bm["num_used_blocks"], "kv_cache_usage": self.blocks.usage(),
                "prefix_cache_hit_rate": bm["hit_rate"], "block_size": self.block_size,
                "max_model_len": self.max_model_len, "backend": self.backend.name, **self.counters}
