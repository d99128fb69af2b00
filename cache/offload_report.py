"""What the offloading cache reports: resident experts, per-layer and total counters (a mixin of
cache/offload.OffloadedExpertProvider, whose state it reads)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from cache.policy import ExpertKey

if TYPE_CHECKING:
    from cache.offload import OffloadedExpertProvider


class OffloadReporting:
    """resident_keys, layer_stats and stats of an OffloadedExpertProvider."""

    def resident_keys(self: "OffloadedExpertProvider") -> set[ExpertKey]:
        """Experts whose weights are in device-tier slots now (not counting loads in flight)."""
        return set(self._resident)

    def layer_stats(self: "OffloadedExpertProvider") -> dict[str, list[float]]:
        out = self.stats_.per_layer()
        out["resident_experts"] = self.resident_per_layer(self.num_layers)
        return out

    def stats(self: "OffloadedExpertProvider") -> dict[str, float]:
        out = self.stats_.flat()
        out["resident_bytes"] = float(len(self._resident) * self.expert_bytes)
        out["slots"] = float(self._dev.num_slots)
        out["slot_bytes"] = float(self.expert_bytes)
        out["expert_bits_per_weight"] = self.fmt.bits_per_weight
        out["allocated_bytes"] = float(self._dev.allocated_bytes)
        out["budget_bytes"] = float(self.budget_bytes)
        out["inflight"] = float(len(self._inflight))
        if self._host is not None:
            out.update(self._host.stats(self.expert_bytes))
        return out
