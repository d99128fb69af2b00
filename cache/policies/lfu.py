"""Least frequently used."""
from __future__ import annotations

from typing import Collection, Mapping, Optional, Sequence

import numpy as np

from cache.policies._rows import MaskedRows
from cache.policy import CachePolicy, ExpertKey

_TICK_BITS = 40     # score = uses << 40 | last use: lexicographic (uses, last) in one int64


class LFUPolicy(CachePolicy):
    """Evict argmin over resident e of (uses(e), last_use(e)): uses counts every access since
    start (kept across evictions), ties go to the least recently used. No prefetch.
    Counts live in arrays; a victim is a masked argmax of -(uses, last) (see _rows.py)."""

    name = "lfu"

    def __init__(self, num_layers: int, num_experts: int, top_k: int) -> None:
        super().__init__(num_layers, num_experts, top_k)
        self._uses = np.zeros((num_layers, num_experts), dtype=np.int64)
        self._rows = MaskedRows(num_layers, num_experts, np.int64)
        self._tick = 0

    def observe(self, layer: int, routed: Mapping[str, Sequence[int]]) -> None:
        pass   # frequencies are counted through on_access

    def _stamp(self, key: ExpertKey) -> None:
        self._tick += 1
        self._rows.vals[key] = -((int(self._uses[key]) << _TICK_BITS) | self._tick)
        self._rows.touch(key[0])

    def on_access(self, key: ExpertKey) -> None:
        self._uses[key] += 1
        self._stamp(key)

    def on_load(self, key: ExpertKey) -> None:
        self._stamp(key)
        self._rows.load(key)

    def on_evict(self, key: ExpertKey) -> None:
        self._rows.evict(key)

    def _synced(self, resident: Collection[ExpertKey], pinned: Collection[ExpertKey]) -> None:
        if not self._rows.n <= len(resident) <= self._rows.n + len(pinned):
            self._rows.sync(resident)      # on_load / on_evict missed (a policy attached late)

    def victim(self, resident: Collection[ExpertKey], pinned: Collection[ExpertKey],
               layer: int) -> Optional[ExpertKey]:
        self._synced(resident, pinned)
        key = self._rows.best(pinned)
        if key is not None and key in resident:
            return key
        self._rows.sync(resident)
        return self._rows.best(pinned)

    def victims(self, resident: Collection[ExpertKey], pinned: Collection[ExpertKey],
                layer: int, n: int) -> list[ExpertKey]:
        self._synced(resident, pinned)
        out = self._rows.best_n(pinned, n)
        if all(k in resident for k in out):
            return out
        self._rows.sync(resident)
        return self._rows.best_n(pinned, n)
