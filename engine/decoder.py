"""The Decoder API: one class per backend over the same Engine (generate, stream, chat)."""
from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Iterator

import torch

from engine.backends.base import Backend, release_free_heap, settle_heap
from engine.config import EngineConfig, ModelConfig
from engine.engine import Engine
from engine.model import fuse_weights
from engine.request import Completion
from engine.sequence import SamplingParams

log = logging.getLogger("pagedecode")


def make_backend(name: str, config: ModelConfig, num_threads: int | None = None) -> Backend:
    """Build a backend by name; 'auto' picks cuda with a GPU, else cpu-int8, else torch."""
    if name == "auto":
        for candidate in ("cuda", "cpu-int8"):
            try:
                return make_backend(candidate, config, num_threads)
            except Exception as exc:  # noqa: BLE001 - report why and fall back
                log.info("backend %s unavailable: %s", candidate, exc)
        return make_backend("torch", config, num_threads)
    if name == "torch":
        from engine.backends.torch_ref import TorchRefBackend
        if num_threads:
            torch.set_num_threads(num_threads)
        return TorchRefBackend(config)
    if name == "cpu-int8":
        from engine.backends.cpu_int8 import CpuInt8Backend
        backend = CpuInt8Backend(config, num_threads=num_threads)
        # The native pool does the heavy work; torch's own OpenMP team would only compete with it
        # for the cores (a batch-1 step measured 13.0 ms with torch at 2 threads, 5.7 ms at 1).
        torch.set_num_threads(1)
        return backend
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("backend 'cuda' needs a CUDA GPU; none is visible to torch")
        from engine.backends.cuda import CudaBackend
        return CudaBackend(config)
    raise ValueError(f"backend must be one of auto, torch, cpu-int8, cuda; got {name!r}")


def params_from(params: SamplingParams | None, overrides: dict) -> SamplingParams:
    """SamplingParams from an optional base and keyword overrides (greedy by default)."""
    if params is not None and overrides:
        raise ValueError("pass either params or keyword sampling options, not both")
    if params is not None:
        return params
    return SamplingParams(**{"temperature": 0.0, **overrides})


class Decoder:
    """Load a model once and generate from it. Subclasses pin the backend."""

    backend_name = "auto"

    def __init__(self, model: str | Path | None = None, config: EngineConfig | None = None, *,
                 model_overrides: dict | None = None, tokenizer_cache: Path | None = None,
                 start: bool = True):
        self.started_at = time.monotonic()
        config = config or EngineConfig()
        if self.backend_name != "auto" and config.backend not in ("auto", self.backend_name):
            raise ValueError(f"{type(self).__name__} runs backend {self.backend_name!r}, config says {config.backend!r}")
        self.config = config
        self._model_overrides = model_overrides
        self._tokenizer_cache = tokenizer_cache
        self.engine: Engine | None = None
        self.load_weights(model, start=start)

    # ---- loading -----------------------------------------------------------------------------
    def load_weights(self, path: str | Path | None = None, start: bool = True) -> None:
        """(Re)load float weights (GGUF, HF folder or our layout); None means the embedded model."""
        from engine.weights import load_model
        self._load(load_model(path, overrides=self._model_overrides), start)

    def load_quantized_weights(self, path: str | Path, start: bool = True) -> None:
        """Load our weights/ layout with its int8/ tensors (written by `convert --int8`)."""
        from engine.weights import load_model
        loaded = load_model(path, overrides=self._model_overrides)
        if not loaded.int8:
            raise ValueError(f"{path}: no int8/ tensors in its manifest; convert with --int8 first")
        self._load(loaded, start)

    def _load(self, loaded, start: bool) -> None:
        """Hand a loaded model to a new backend, free the loader's copies, and start an engine on it."""
        if self.engine is not None:
            # The old engine's KV cache goes first: on a GPU it holds most of the memory the new one is sized on.
            self.engine.stop()
            self.engine.backend.release_kv_cache()
            self.engine = None
        backend = make_backend(self.backend_name if self.backend_name != "auto" else self.config.backend,
                               loaded.config, self.config.num_threads)
        if loaded.int8 and hasattr(backend, "load_quantized_weights"):
            backend.load_quantized_weights(loaded.int8, fuse_weights(loaded.tensors, loaded.config))
        else:
            backend.load_weights(fuse_weights(loaded.tensors, loaded.config))
        # The backend now holds its own form of the weights: let the loader's float copies go, and give
        # their pages back to the OS (an INT8 backend would otherwise keep ~4x its weights resident).
        loaded.tensors.clear()
        if loaded.int8:
            loaded.int8.clear()
        gc.collect()
        release_free_heap()
        self._install(loaded, backend, start)

    def _install(self, loaded, backend: Backend, start: bool) -> None:
        from engine.tokenizer import Tokenizer
        if self.engine is not None:
            self.engine.stop()
        kwargs = {"cache_dir": self._tokenizer_cache} if self._tokenizer_cache else {}
        tokenizer = Tokenizer.load(loaded.tokenizer_source, **kwargs)
        self.engine = Engine(loaded.config, backend, self.config, tokenizer)
        self.model_config = loaded.config
        self.tokenizer = tokenizer
        self.model_name = getattr(loaded, "name", None) or Path(loaded.source).stem
        settle_heap()                               # what lives as long as the model leaves the GC's scans
        if start:
            self.engine.start()

    # ---- generation --------------------------------------------------------------------------
    def generate(self, prompt: str | list[int] | list[str], params: SamplingParams | None = None,
                 **options) -> Completion | list[Completion]:
        """Complete one prompt (or a list of prompts, run concurrently); greedy unless told otherwise."""
        params = params_from(params, options)
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            handles = [self.engine.submit(p, params) for p in prompt]
            return [h.result() for h in handles]
        return self.engine.submit(prompt, params).result()

    def stream(self, prompt: str | list[int] | None = None, params: SamplingParams | None = None, *,
               messages: list[dict] | None = None, **options) -> Iterator[str]:
        """Yield text deltas as they are produced; closing the iterator aborts the request."""
        handle = self.engine.submit(prompt, params_from(params, options), messages=messages)
        try:
            for out in handle:
                if out.text:
                    yield out.text
        finally:
            handle.cancel()

    def chat(self, messages: list[dict], params: SamplingParams | None = None, **options) -> Completion:
        """Answer the last user turn; earlier turns' KV comes from the prefix cache."""
        return self.engine.submit(None, params_from(params, options), messages=messages).result()

    def beam_search(self, prompt: str | list[int] | None = None, params=None, *,
                    messages: list[dict] | None = None, **options) -> Completion:
        """Beam search (BeamParams or its fields as keywords); .beams holds the candidates, best first."""
        from engine.beam import BeamParams
        if params is not None and options:
            raise ValueError("pass either params or keyword beam options, not both")
        params = params or BeamParams(**options)
        return self.engine.submit_beam(prompt, params, messages=messages).result()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TorchDecoder(Decoder):
    backend_name = "torch"


class INT8Decoder(Decoder):
    backend_name = "cpu-int8"


class CUDADecoder(Decoder):
    backend_name = "cuda"
