"""The two limits of the replay, as policies with perfect knowledge of the future accesses.

They only make sense inside the simulator (bench/replay_sim.py), which owns the ``Future``
and moves its position before every access.
"""
from __future__ import annotations

import bisect
import math
from typing import Collection, Mapping, Optional, Sequence

from cache.policy import CachePolicy, ExpertKey


class Future:
    """Every expert access of the replay in order; ``pos`` is the index of the access now due."""

    def __init__(self, accesses: Sequence[ExpertKey]) -> None:
        self.accesses = list(accesses)
        self.pos = 0
        self._at: dict[ExpertKey, list[int]] = {}
        for i, key in enumerate(self.accesses):
            self._at.setdefault(key, []).append(i)

    def next_use(self, key: ExpertKey, after: Optional[int] = None) -> float:
        """Index of the first access of ``key`` at or after ``after`` (default: now); inf if none."""
        idx = self._at.get(key)
        if not idx:
            return math.inf
        i = bisect.bisect_left(idx, self.pos if after is None else after)
        return idx[i] if i < len(idx) else math.inf


class BeladyPolicy(CachePolicy):
    """Optimal offline caching (Belady's MIN): evict the resident expert whose next use is
    furthest in the future. No prefetch."""

    name = "belady"

    def __init__(self, num_layers: int, num_experts: int, top_k: int, future: Future) -> None:
        super().__init__(num_layers, num_experts, top_k)
        self.future = future

    def observe(self, layer: int, routed: Mapping[str, Sequence[int]]) -> None:
        pass

    def victim(self, resident: Collection[ExpertKey], pinned: Collection[ExpertKey],
               layer: int) -> Optional[ExpertKey]:
        best: Optional[ExpertKey] = None
        best_t = -1.0
        for key in resident:
            if key in pinned:
                continue
            t = self.future.next_use(key)
            if t > best_t:
                best, best_t = key, t
        return best


class OraclePolicy(BeladyPolicy):
    """Perfect future knowledge with prefetch: as the link allows, load the missing experts
    needed soonest, each only if it is needed before the resident expert it would displace
    (the one needed latest, which is also the eviction victim)."""

    name = "oracle"

    def prefetch(self, layer: int, resident: Collection[ExpertKey], limit: int) -> list[ExpertKey]:
        if limit <= 0:
            return []
        fut = self.future
        held = sorted((fut.next_use(k) for k in resident), reverse=True)
        out: list[ExpertKey] = []
        seen: set[ExpertKey] = set()
        # the current layer's accesses are done when prefetch is asked: look past them
        for i in range(fut.pos, len(fut.accesses)):
            key = fut.accesses[i]
            if key in seen or key in resident:
                continue
            seen.add(key)
            n = len(out)
            if n >= len(held) or not i < held[n]:
                break
            out.append(key)
            if len(out) >= limit:
                break
        return out
