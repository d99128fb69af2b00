"""Prometheus text exposition (format 0.0.4) without a client library: counters, histograms, gauges."""
from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Optional

from engine.protocol import EngineStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1   # per bucket here; made cumulative on output
                break

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for upper, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{upper}"}} {acc}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.total}', f"{name}_sum {self.sum:.6f}",
                f"{name}_count {self.total}"]
        return out


def _num(v: float) -> str:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return "NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf")
    return repr(int(v)) if float(v).is_integer() else repr(float(v))


def _metric_name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key).strip("_").lower()


class Metrics:
    """Server-side counters; engine-side numbers are read from EngineStats at scrape time."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = defaultdict(int)   # (route, status) -> count
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.ttft = Histogram()
        self.itl = Histogram()

    def request_done(self, route: str, status: int) -> None:
        self.requests[(route, status)] += 1

    def render(self, queue_depth: int, in_flight: int, stats: Optional[EngineStats],
               engine_up: bool) -> str:
        L: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            L.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

        metric("moeserve_requests_total", "counter", "HTTP requests by route and status",
               [f'moeserve_requests_total{{route="{r}",status="{s}"}} {n}'
                for (r, s), n in sorted(self.requests.items())])
        metric("moeserve_prompt_tokens_total", "counter", "prompt tokens of accepted requests",
               [f"moeserve_prompt_tokens_total {self.prompt_tokens}"])
        metric("moeserve_generation_tokens_total", "counter", "tokens generated",
               [f"moeserve_generation_tokens_total {self.generated_tokens}"])
        metric("moeserve_queue_depth", "gauge", "requests waiting for their first token",
               [f"moeserve_queue_depth {queue_depth}"])
        metric("moeserve_requests_in_flight", "gauge", "requests submitted and not finished",
               [f"moeserve_requests_in_flight {in_flight}"])
        metric("moeserve_engine_up", "gauge", "1 when the engine is ready",
               [f"moeserve_engine_up {int(engine_up)}"])
        metric("moeserve_time_to_first_token_seconds", "histogram",
               "time from request arrival to its first generated token",
               self.ttft.lines("moeserve_time_to_first_token_seconds"))
        metric("moeserve_inter_token_latency_seconds", "histogram",
               "time between consecutive generated tokens of a request",
               self.itl.lines("moeserve_inter_token_latency_seconds"))
        if stats is not None:
            metric("moeserve_running_batch_size", "gauge", "requests in the engine's running batch",
                   [f"moeserve_running_batch_size {stats.running}"])
            metric("moeserve_engine_waiting", "gauge", "requests queued inside the engine",
                   [f"moeserve_engine_waiting {stats.waiting}"])
            for field in ("requests_finished", "requests_aborted", "requests_failed", "prompt_tokens",
                          "generated_tokens", "steps"):
                name = f"moeserve_engine_{field}_total"
                metric(name, "counter", f"engine {field.replace('_', ' ')}",
                       [f"{name} {_num(getattr(stats, field))}"])
            for key, value in sorted(stats.cache.items()):
                name = f"moeserve_expert_cache_{_metric_name(key)}"
                metric(name, "gauge", f"expert cache: {key.replace('_', ' ')}", [f"{name} {_num(value)}"])
            for key, series in sorted(stats.cache_layers.items()):
                name = f"moeserve_expert_cache_layer_{_metric_name(key)}"   # {layer="3"} per layer
                metric(name, "gauge", f"expert cache per MoE layer: {key.replace('_', ' ')}",
                       [f'{name}{{layer="{i}"}} {_num(v)}' for i, v in enumerate(series)])
        return "\n".join(L) + "\n"
