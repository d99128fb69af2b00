"""Counters of the offloading cache, per tier and per MoE layer: totals by name, and per-layer
series by name (typed data across the engine boundary; nobody parses "layer.<i>.<name>")."""
from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class Counters:
    """One set of counters (the totals, or one layer's share)."""

    hits: int = 0                # expert uses found resident when the layer asked
    misses: int = 0              # expert uses that had to wait for a load
    loads: int = 0               # demand loads issued
    prefetch_issued: int = 0
    prefetch_used: int = 0       # prefetched experts used before being evicted
    prefetch_wasted: int = 0     # prefetched experts evicted without being used
    prefetch_dropped: int = 0    # prefetches withdrawn before their read started (not needed)
    evictions: int = 0
    bytes_disk: int = 0          # bytes read from the checkpoint files
    bytes_h2d: int = 0           # bytes copied host -> device (CUDA)
    host_hits: int = 0           # CUDA: device loads served from the host tier
    host_misses: int = 0         # CUDA: device loads that went to disk
    cpu_computed: int = 0        # CUDA, --cpu-experts auto: misses computed on the CPU instead
    stall_seconds: float = 0.0   # engine thread blocked waiting for a needed expert

    def items(self) -> list[tuple[str, float]]:
        return [(f.name, float(getattr(self, f.name))) for f in fields(self)]


@dataclass
class CacheStats:
    total: Counters = field(default_factory=Counters)
    layers: list[Counters] = field(default_factory=list)

    @classmethod
    def for_layers(cls, num_layers: int) -> "CacheStats":
        return cls(Counters(), [Counters() for _ in range(num_layers)])

    def add(self, layer: int, name: str, amount: float = 1) -> None:
        setattr(self.total, name, getattr(self.total, name) + amount)
        per = self.layers[layer]
        setattr(per, name, getattr(per, name) + amount)

    def flat(self) -> dict[str, float]:
        """The totals: ``hits``, ``misses``, ..., ``accesses`` and ``hit_rate``."""
        out = dict(self.total.items())
        out["accesses"] = out["hits"] + out["misses"]
        out["hit_rate"] = out["hits"] / out["accesses"] if out["accesses"] else 0.0
        return out

    def per_layer(self) -> dict[str, list[float]]:
        """Every counter as a series over the MoE layers: name -> [value of layer 0, 1, ...]."""
        return {f.name: [float(getattr(per, f.name)) for per in self.layers]
                for f in fields(Counters)}
