"""Least recently used."""
from __future__ import annotations

from collections import OrderedDict
from typing import Collection, Mapping, Optional, Sequence

from cache.policy import CachePolicy, ExpertKey


class LRUPolicy(CachePolicy):
    """Evict argmin over resident e of last_use(e) (loads count as a use). No prefetch."""

    name = "lru"

    def __init__(self, num_layers: int, num_experts: int, top_k: int) -> None:
        super().__init__(num_layers, num_experts, top_k)
        self._order: "OrderedDict[ExpertKey, None]" = OrderedDict()   # oldest first

    def observe(self, layer: int, routed: Mapping[str, Sequence[int]]) -> None:
        pass   # recency is tracked through on_access / on_load

    def on_access(self, key: ExpertKey) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    on_load = on_access

    def on_evict(self, key: ExpertKey) -> None:
        self._order.pop(key, None)

    def victim(self, resident: Collection[ExpertKey], pinned: Collection[ExpertKey],
               layer: int) -> Optional[ExpertKey]:
        for key in self._order:
            if key in resident and key not in pinned:
                return key
        # resident experts this policy never saw (loaded before it was attached) go first
        for key in resident:
            if key not in pinned:
                return key
        return None
