"""Per-request activation matrices as a policy sees them through ``observe`` (shared helper).

Each live request owns a slot in [S, L, E] arrays, so one layer's routing of a whole batch is
a few vectorised updates. Whether a pass is a prompt pass comes from the split
(cache/routing.py ``Routed.prompt``; guessed from the number of ids only for plain mappings);
prompt and decode counts are kept apart, as in the tracer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

from cache.eam import EAMCollection
from cache.policies._jit import njit
from cache.routing import prompt_pass


@dataclass
class LayerBatch:
    """One layer's routing, split: decode requests as [B, k] arrays, prompt ones as lists."""

    dec_sids: list[str]
    dec_slots: np.ndarray        # [B] slot per decode request
    dec_ids: np.ndarray          # [B, k] distinct experts of its token (padding: expert 0, weight 0)
    dec_w: np.ndarray            # [B, k] 1.0, or 0.0 for padding
    pro: list[tuple[str, int, np.ndarray]]   # (sid, slot, expert ids with repeats) per prompt request


class RequestTracker:
    """Tracks each live request's matrices and where its current pass is."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int) -> None:
        self.L, self.E, self.k = num_layers, num_experts, top_k
        self.live: dict[str, int] = {}          # sid -> slot
        self._free: list[int] = []
        self._alloc(4)

    def _alloc(self, n: int) -> None:
        L, E, m = self.L, self.E, self.capacity if hasattr(self, "prompt") else 0
        self.prompt = grow(getattr(self, "prompt", None), (n, L, E))
        self.decode = grow(getattr(self, "decode", None), (n, L, E))
        self.decode_passes = grow(getattr(self, "decode_passes", None), (n,), np.int64)
        self.layers_seen = grow(getattr(self, "layers_seen", None), (n,), np.int64)
        self.in_prompt = grow(getattr(self, "in_prompt", None), (n,), bool)
        self._free.extend(range(n - 1, m - 1, -1))

    @property
    def capacity(self) -> int:
        return self.prompt.shape[0]

    def slot(self, sid: str) -> int:
        """The slot of ``sid``, allocated (zeroed) on first sight."""
        s = self.live.get(sid)
        if s is None:
            if not self._free:
                self._alloc(2 * self.capacity)
            s = self.live[sid] = self._free.pop()
        return s

    def begin_step(self, seq_ids: Sequence[str]) -> np.ndarray:
        slots = np.array([self.slot(sid) for sid in seq_ids], dtype=np.int64)
        self.layers_seen[slots] = 0
        return slots

    def observe(self, layer: int, routed: Mapping[str, Sequence[int]]) -> LayerBatch:
        k = self.k
        dec_sids, dec_slots, dec_rows, pro = [], [], [], []
        for sid, experts in routed.items():
            s = self.slot(sid)
            if layer == 0:
                self.in_prompt[s] = prompt_pass(routed, sid, len(experts), k)
            if self.in_prompt[s]:
                pro.append((sid, s, np.asarray(experts, dtype=np.int64)))
            else:
                dec_sids.append(sid)
                dec_slots.append(s)
                dec_rows.append(experts)
        slots = np.array(dec_slots, dtype=np.int64)
        ids, w = _pad(dec_rows, k)
        if len(slots):
            count_decode(self.decode, self.layers_seen, self.decode_passes, slots, layer, ids, w)
        for _, s, e in pro:
            np.add.at(self.prompt[s, layer], e, 1.0)
            self.layers_seen[s] = layer + 1
        return LayerBatch(dec_sids, slots, ids, w, pro)

    def query(self, sid: str) -> tuple[np.ndarray, Optional[int]]:
        """(matrix to match, layers to compare): decode counts once a decode pass is complete
        (all layers), else the current pass's layers."""
        s = self.live[sid]
        if self.decode_passes[s] > 0:
            return self.decode[s], None
        seen = max(1, int(self.layers_seen[s]))
        if self.in_prompt[s] or not self.decode[s].any():
            return self.prompt[s], (None if not self.in_prompt[s] else seen)
        return self.prompt[s] + self.decode[s], seen

    def finish(self, sid: str, collection: Optional[EAMCollection]) -> Optional[int]:
        """Drop the request; its decode matrix (prompt when it decoded nothing) joins the
        collection. Returns the freed slot."""
        s = self.live.pop(sid, None)
        if s is None:
            return None
        if collection is not None:
            collection.insert(self.decode[s] if self.decode[s].any() else self.prompt[s])
        self.prompt[s] = 0.0
        self.decode[s] = 0.0
        self.decode_passes[s] = self.layers_seen[s] = 0
        self.in_prompt[s] = False
        self._free.append(s)
        return s


def _pad(rows: list[Sequence[int]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode rows as [B, k] distinct ids and weights (a row with repeats or fewer ids is padded)."""
    if all(len(r) == k and len(set(r)) == k for r in rows):
        return np.array(rows, dtype=np.int64).reshape(len(rows), k), np.ones((len(rows), k))
    ids = np.zeros((len(rows), k), dtype=np.int64)
    w = np.zeros((len(rows), k))
    for b, r in enumerate(rows):
        u = sorted(set(r))[:k]
        ids[b, :len(u)] = u
        w[b, :len(u)] = 1.0
    return ids, w


@njit(cache=True)
def count_decode(decode, layers_seen, decode_passes, slots, layer, ids, w):
    """A decode pass at ``layer``: decode[s, layer, ids[b]] += w[b] for the request in slot
    s = slots[b]; its pass has now seen layer + 1 layers (a whole pass after the last)."""
    last = layer == decode.shape[1] - 1
    for b in range(slots.shape[0]):
        s = slots[b]
        for j in range(ids.shape[1]):
            decode[s, layer, ids[b, j]] += w[b, j]
        layers_seen[s] = layer + 1
        if last:
            decode_passes[s] += 1


def grow(old: Optional[np.ndarray], shape: tuple[int, ...], dtype: type = np.float64,
         fill: float = 0.0) -> np.ndarray:
    """A ``shape`` array holding ``old`` in its leading rows (slot arrays double as needed)."""
    out = np.full(shape, fill, dtype=dtype)
    if old is not None:
        out[:old.shape[0]] = old
    return out
