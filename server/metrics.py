"""/metrics through prometheus-client: the server's own counters and histograms live in a
registry per app; the engine's numbers (an EngineStats snapshot) are read at scrape time by a
collector. Names follow the Prometheus conventions: counters end in _total, sizes in _bytes,
times in _seconds."""
from __future__ import annotations

from typing import Callable, Iterator, Optional

from prometheus_client import (CollectorRegistry, Counter, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.protocol import EngineStats

disable_created_metrics()   # no *_created series: they double the output and nobody here reads them

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# expert-cache stats that are levels; every other key is a running count (a counter)
CACHE_GAUGES = frozenset({"hit_rate", "resident_bytes", "resident_experts", "slots", "slot_bytes", "allocated_bytes",
                          "budget_bytes", "inflight", "host_slots", "host_resident_bytes",
                          "host_allocated_bytes", "expert_bits_per_weight"})
ENGINE_COUNTERS = ("requests_finished", "requests_aborted", "requests_failed", "prompt_tokens",
                   "prompt_tokens_cached", "generated_tokens", "steps")


def _name(key: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in key).strip("_").lower()


class _EngineCollector(Collector):
    """Queue gauges and the engine's snapshot, read when scraped (a scrape never waits for a
    step: the engine publishes its counters as it goes)."""

    def __init__(self, read: Callable[[], tuple[int, int, Optional[EngineStats], bool]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        queue_depth, in_flight, stats, up = self.read()
        yield GaugeMetricFamily("moeserve_queue_depth", "requests waiting for their first token",
                                value=queue_depth)
        yield GaugeMetricFamily("moeserve_requests_in_flight",
                                "requests submitted and not finished", value=in_flight)
        yield GaugeMetricFamily("moeserve_engine_up", "1 when the engine is ready", value=int(up))
        if stats is None:
            return
        yield GaugeMetricFamily("moeserve_running_batch_size",
                                "requests in the engine's running batch", value=stats.running)
        yield GaugeMetricFamily("moeserve_engine_waiting", "requests queued inside the engine",
                                value=stats.waiting)
        for field in ENGINE_COUNTERS:
            yield CounterMetricFamily(f"moeserve_engine_{field}",
                                      f"engine {field.replace('_', ' ')}",
                                      value=getattr(stats, field))
        for key, value in sorted(stats.cache.items()):
            name, what = "moeserve_expert_cache_" + _name(key), f"expert cache: {key.replace('_', ' ')}"
            yield (GaugeMetricFamily(name, what, value=value) if key in CACHE_GAUGES
                   else CounterMetricFamily(name, what, value=value))
        for key, series in sorted(stats.cache_layers.items()):       # {layer="3"} per MoE layer
            name = "moeserve_expert_cache_layer_" + _name(key)
            what = f"expert cache per MoE layer: {key.replace('_', ' ')}"
            fam = (GaugeMetricFamily(name, what, labels=["layer"]) if key in CACHE_GAUGES
                   else CounterMetricFamily(name, what, labels=["layer"]))
            for i, v in enumerate(series):
                fam.add_metric([str(i)], v)
            yield fam


class Metrics:
    """The server's metrics, in a registry of their own (several apps may live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("moeserve_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("moeserve_prompt_tokens", "prompt tokens of accepted requests",
                                     registry=r)
        self.generated_tokens = Counter("moeserve_generation_tokens", "tokens generated",
                                        registry=r)
        self.ttft = Histogram("moeserve_time_to_first_token_seconds",
                              "time from request arrival to its first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("moeserve_inter_token_latency_seconds",
                             "time between consecutive generated tokens of a request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self._source: Callable[[], tuple[int, int, Optional[EngineStats], bool]] = \
            lambda: (0, 0, None, False)
        r.register(_EngineCollector(lambda: self._source()))

    def request_done(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()

    def render(self, queue_depth: int, in_flight: int, stats: Optional[EngineStats],
               engine_up: bool) -> str:
        self._source = lambda: (queue_depth, in_flight, stats, engine_up)
        return generate_latest(self.registry).decode("utf-8")


