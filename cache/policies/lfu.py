"""Least frequently used."""
from __future__ import annotations

from typing import Collection, Mapping, Optional, Sequence

from cache.policy import CachePolicy, ExpertKey


class LFUPolicy(CachePolicy):
    """Evict argmin over resident e of (uses(e), last_use(e)): uses counts every access since
    start (kept across evictions), ties go to the least recently used. No prefetch."""

    name = "lfu"

    def __init__(self, num_layers: int, num_experts: int, top_k: int) -> None:
        super().__init__(num_layers, num_experts, top_k)
        self._uses: dict[ExpertKey, int] = {}
        self._last: dict[ExpertKey, int] = {}
        self._tick = 0

    def observe(self, layer: int, routed: Mapping[str, Sequence[int]]) -> None:
        pass   # frequencies are counted through on_access

    def on_access(self, key: ExpertKey) -> None:
        self._tick += 1
        self._uses[key] = self._uses.get(key, 0) + 1
        self._last[key] = self._tick

    def on_load(self, key: ExpertKey) -> None:
        self._tick += 1
        self._last[key] = self._tick

    def victim(self, resident: Collection[ExpertKey], pinned: Collection[ExpertKey],
               layer: int) -> Optional[ExpertKey]:
        best: Optional[ExpertKey] = None
        best_score = (0, 0)
        uses, last = self._uses, self._last
        for key in resident:
            if key in pinned:
                continue
            score = (uses.get(key, 0), last.get(key, 0))
            if best is None or score < best_score:
                best, best_score = key, score
        return best
