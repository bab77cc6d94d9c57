"""Prometheus metrics on a per-app CollectorRegistry (never the global one).

Engine gauges are read from Engine.stats() at scrape time; latency histograms are observed by
the routes as tokens stream out (webapp/runtime.py's Generation).
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)

# stats() key -> (metric name, help); gauges then counters.
_GAUGES = {
    "num_running": ("pagedecode_requests_running", "Requests the engine is running (decoding or prefilling)."),
    "num_waiting": ("pagedecode_requests_waiting", "Requests queued inside the engine."),
    "kv_cache_usage": ("pagedecode_kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0..1)."),
    "num_blocks": ("pagedecode_kv_blocks_total", "KV cache blocks in the pool."),
    "num_free_blocks": ("pagedecode_kv_blocks_free", "KV cache blocks free (including cached, evictable)."),
    "num_used_blocks": ("pagedecode_kv_blocks_used", "KV cache blocks held by sequences."),
    "prefix_cache_hit_rate": ("pagedecode_prefix_cache_hit_rate", "Prefix cache block hit rate (0..1)."),
}
_COUNTERS = {
    "tokens_generated": ("pagedecode_generated_tokens", "Tokens generated."),
    "requests_finished": ("pagedecode_engine_requests_finished", "Requests the engine finished."),
    "preemptions": ("pagedecode_preemptions", "Sequences preempted for lack of KV blocks."),
    "prefill_tokens": ("pagedecode_prefill_tokens", "Prompt tokens run through prefill."),
}


class EngineCollector:
    """Turns one stats() snapshot into gauges and counters at each scrape."""

    def __init__(self, stats: Callable[[], dict], admission):
        self._stats = stats
        self._admission = admission

    def collect(self):
        stats = self._stats()
        for key, (name, doc) in _GAUGES.items():
            if key in stats:
                yield GaugeMetricFamily(name, doc, value=float(stats[key]))
        for key, (name, doc) in _COUNTERS.items():
            if key in stats:
                yield CounterMetricFamily(name, doc, value=float(stats[key]))
        yield GaugeMetricFamily("pagedecode_http_generations_active", "Requests admitted by the server.",
                                value=self._admission.num_running)
        yield GaugeMetricFamily("pagedecode_http_generations_queued", "Requests waiting for admission.",
                                value=self._admission.num_waiting)
        yield GaugeMetricFamily("pagedecode_model_ready", "1 once the model is loaded.",
                                value=1.0 if stats else 0.0)


class Metrics:
    """The app's registry: engine collector, TTFT and inter-token latency, HTTP responses."""

    def __init__(self, stats: Callable[[], dict], admission):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(stats, admission))
        self.ttft = Histogram("pagedecode_time_to_first_token_seconds", "Time from submit to the first token.",
                              buckets=_TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("pagedecode_inter_token_latency_seconds", "Time between consecutive tokens.",
                             buckets=_ITL_BUCKETS, registry=self.registry)
        self.responses = Counter("pagedecode_http_responses", "HTTP responses by route and status.",
                                 ["route", "status"], registry=self.registry)
        self.aborted = Counter("pagedecode_requests_aborted", "Requests aborted (client gone or stop).",
                               registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
