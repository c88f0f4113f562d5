"""Prometheus metrics of the server: request latency histograms, queue gauges and the engine's own stats."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

PREFIX = "hybrid_engine"
_TTFT_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0)

# llm.stats() keys exported as gauges, with their help text; other numeric keys are exported too, generically.
ENGINE_GAUGES = {
    "kv_blocks_total": "KV-cache blocks in the pool",
    "kv_blocks_free": "KV-cache blocks holding nothing",
    "kv_blocks_cached": "KV-cache blocks no request holds, kept for prefix reuse (evicted LRU when needed)",
    "prefix_cache_hit_tokens": "prompt tokens whose KV came from the prefix cache",
    "prefix_cache_queried_tokens": "prompt tokens looked up in the prefix cache",
    "prefix_cache_hit_rate": "prefix_cache_hit_tokens / prefix_cache_queried_tokens",
    "graphs_captured": "CUDA graphs captured and ready to replay",
    "graphs_pending": "CUDA graphs waiting for the capture worker",
    "graphs_failed": "CUDA graph captures that failed (those shapes run on the JIT path)",
    "graph_pool_bytes": "bytes held by the shared CUDA-graph memory pool",
    "requests_served": "requests the engine finished",
    "requests_failed": "requests the engine failed",
    "decode_batch_sizes": "decode steps run, by batch size (rows)",
    "graph_steps": "engine steps (prefills, prompt chunks, decodes) that replayed a CUDA graph",
    "jit_steps": "engine steps that ran on the JIT path",
    "prefill_chunks": "prompt chunks run beside decoding sequences",
    "prefill_batches": "steps that prefilled several prompts in one forward pass (batched_prefill)",
    "prefill_batched_sequences": "prompts prefilled in those steps",
    "preemptions": "sequences preempted (their KV freed, recomputed later)",
}
ENGINE_LABELLED = {"decode_batch_sizes": "batch_size"}  # dict-valued stats: one gauge per key, as this label
ENGINE_INFO_KEYS = ("attention_backend", "device", "dtype", "capture")


def engine_metric_name(key: str) -> str:
    """hybrid_engine_<key>; the engine's own request counters get an `engine_` infix (the server has its own)."""
    return f"{PREFIX}_engine_{key}" if key.startswith("requests") else f"{PREFIX}_{key}"


class EngineStatsCollector(Collector):
    """Reads llm.stats() at scrape time, so the gauges are never stale."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        try:
            stats = self._stats()
        except Exception:  # a scrape must not take the server down
            logger.exception("llm.stats() failed during a metrics scrape")
            return
        for key, value in sorted(stats.items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key.isidentifier():
                help_text = ENGINE_GAUGES.get(key, f"engine stat {key!r} from llm.stats()")
                yield GaugeMetricFamily(engine_metric_name(key), help_text, value=float(value))
        for key, label in ENGINE_LABELLED.items():
            if isinstance(stats.get(key), dict):
                family = GaugeMetricFamily(engine_metric_name(key), ENGINE_GAUGES[key], labels=[label])
                for name, value in sorted(stats[key].items()):
                    family.add_metric([str(name)], float(value))
                yield family
        info = {k: str(stats[k]) for k in ENGINE_INFO_KEYS if k in stats}
        if info:
            yield InfoMetricFamily(f"{PREFIX}_engine", "engine configuration", value=info)


class ServerMetrics:
    """Every metric of one server, in its own registry (several apps may live in one process)."""

    def __init__(self, stats: Callable[[], dict[str, Any]], queued: Callable[[], int],
                 running: Callable[[], int]) -> None:
        reg = self.registry = CollectorRegistry()
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                              "arrival of the request to its first token, queue wait included",
                              buckets=_TTFT_BUCKETS, registry=reg)
        self.token_latency = Histogram(f"{PREFIX}_time_per_output_token_seconds",
                                       "time between consecutive output tokens (after the first)",
                                       buckets=_TOKEN_BUCKETS, registry=reg)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "arrival to last token",
                             buckets=_E2E_BUCKETS, registry=reg)
        self.queue_wait = Histogram(f"{PREFIX}_queue_wait_seconds", "time a request waited for the engine",
                                    buckets=_E2E_BUCKETS, registry=reg)
        self.in_flight = Gauge(f"{PREFIX}_requests_in_flight",
                               "generation requests admitted and not finished (queued + running)", registry=reg)
        Gauge(f"{PREFIX}_requests_queued", "requests waiting in the FIFO queue",
              registry=reg).set_function(queued)
        Gauge(f"{PREFIX}_requests_running", "requests the engine is generating now",
              registry=reg).set_function(running)
        self.requests = Counter(f"{PREFIX}_requests", "finished generation requests by endpoint and HTTP status",
                                ["endpoint", "status"], registry=reg)
        self.rejected = Counter(f"{PREFIX}_requests_rejected_queue_full", "requests answered 429", registry=reg)
        self.cancelled = Counter(f"{PREFIX}_requests_cancelled", "requests cancelled by a client disconnect",
                                 registry=reg)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "prompt tokens processed", registry=reg)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "tokens generated", registry=reg)
        reg.register(EngineStatsCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
