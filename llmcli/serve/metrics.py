"""Metrics: the server's Prometheus registry (GET /metrics), engine gauges read at scrape time plus latency
histograms the request handlers observe."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from llmcli.engine.async_engine import EngineStats

PREFIX = "llmcli"
# seconds; first tokens include queueing and prefill, inter-token gaps are one batched decode step
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class _EngineCollector:
    """EngineStats as Prometheus families, read when /metrics is scraped (no polling thread)."""

    def __init__(self, stats: Callable[[], EngineStats | None]):
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats() or EngineStats()
        gauges = {
            "num_requests_running": ("Samples in the running batch", s.running),
            "num_requests_waiting": ("Samples waiting to be scheduled", s.waiting),
            "kv_cache_blocks_used": ("KV-cache blocks in use", s.kv_blocks_used),
            "kv_cache_blocks_total": ("KV-cache blocks in the pool", s.kv_blocks_total),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        counters = {
            "prefix_cache_hit_tokens": ("Prompt tokens found in the prefix cache", s.prefix_cache_hit_tokens),
            "prompt_tokens": ("Prompt tokens of admitted requests", s.prompt_tokens),
            "generation_tokens": ("Generated tokens", s.generation_tokens),
            "num_preemptions": ("Samples preempted when the KV cache ran out", s.preemptions),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats | None]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats))
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "From the request's arrival to its first generated token",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Between consecutive tokens of one sample",
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
