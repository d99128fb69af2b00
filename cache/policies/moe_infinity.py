"""MoE-Infinity (Xue et al., 2024): activation-matrix prediction, prefetch and eviction."""
from __future__ import annotations

from typing import Collection, Mapping, Optional, Sequence

import numpy as np

from cache.eam import EAMCollection, row_normalise
from cache.policies._tracking import RequestTracker
from cache.policy import CachePolicy, ExpertKey

EPS = 1e-4


class MoEInfinityPolicy(CachePolicy):
    """The paper's policy, for L MoE layers, current layer l:

    pEAM = row-normalised sum of the collection entries nearest (cosine, flattened, over the
    layers seen so far) to the running request's matrix; with an empty collection, the running
    request's own row-normalised matrix (uniform on rows it has not routed yet).
    Batches: the mean of the requests' pEAMs.

    prefetch priority of expert j of layer i > l (this pass only, as in the paper):
        pEAM[i][j] x (1 - (i - l) / L)
    eviction: the resident e of layer l_e minimising
        (pEAM[l_e][e] + eps) x (1 - l_e / L) / sum_j pEAM[l_e][j]
    ties to the least recently used. Finished requests enter the collection.
    """

    name = "moe-infinity"

    def __init__(self, num_layers: int, num_experts: int, top_k: int,
                 collection: Optional[EAMCollection] = None, nearest: int = 3) -> None:
        super().__init__(num_layers, num_experts, top_k)
        self.collection = collection if collection is not None else EAMCollection(
            num_layers, num_experts)
        self.nearest = nearest
        self._req = RequestTracker(num_layers, num_experts, top_k)
        self._active: list[str] = []
        self._pred = np.full((num_layers, num_experts), 1.0 / num_experts)   # [L, E]
        self._last: dict[ExpertKey, int] = {}
        self._tick = 0
        L = num_layers
        self._layer_w = 1.0 - np.arange(L) / L                               # [L]
        self._keep = ((self._pred + EPS) * self._layer_w[:, None]).tolist()  # [L][E]

    def begin_step(self, seq_ids: Sequence[str]) -> None:
        self._active = list(seq_ids)
        self._req.begin_step(seq_ids)

    def _predict(self) -> np.ndarray:
        preds = []
        for sid in self._active:
            if sid not in self._req.live:
                continue
            mat, seen = self._req.query(sid)
            p = self.collection.match(mat, seen, self.nearest)
            if p is None:
                p = row_normalise(mat)
            preds.append(p)
        if not preds:
            return np.full((self.num_layers, self.num_experts), 1.0 / self.num_experts)
        p = np.mean(preds, axis=0)
        empty = p.sum(axis=1) == 0
        p[empty] = 1.0 / self.num_experts
        return p

    def observe(self, layer: int, routed: Mapping[str, Sequence[int]]) -> None:
        self._req.observe(layer, routed)
        if not self._active:
            self._active = list(routed)
        self._pred = self._predict()
        p = self._pred
        rows = np.maximum(p.sum(axis=1, keepdims=True), EPS)
        # eviction score per (layer, expert), computed once per layer rather than per victim call
        self._keep = ((p + EPS) * self._layer_w[:, None] / rows).tolist()

    def prefetch(self, layer: int, resident: Collection[ExpertKey], limit: int) -> list[ExpertKey]:
        if limit <= 0 or layer + 1 >= self.num_layers:
            return []
        L = self.num_layers
        ahead = self._pred[layer + 1:]                                       # [L-l-1, E]
        dist = np.arange(1, L - layer)[:, None]                              # [L-l-1, 1]
        prio = ahead * (1.0 - dist / L)
        order = np.argsort(-prio, axis=None, kind="stable")
        out: list[ExpertKey] = []
        for flat in order:
            i, j = divmod(int(flat), self.num_experts)
            if prio[i, j] <= 0:
                break
            key = (layer + 1 + i, j)
            if key not in resident:
                out.append(key)
                if len(out) >= limit:
                    break
        return out

    def victim(self, resident: Collection[ExpertKey], pinned: Collection[ExpertKey],
               layer: int) -> Optional[ExpertKey]:
        keep, last = self._keep, self._last
        best: Optional[ExpertKey] = None
        best_score = (0.0, 0)
        for key in resident:
            if key in pinned:
                continue
            score = (keep[key[0]][key[1]], last.get(key, 0))
            if best is None or score < best_score:
                best, best_score = key, score
        return best

    def on_access(self, key: ExpertKey) -> None:
        self._tick += 1
        self._last[key] = self._tick

    on_load = on_access

    def end_request(self, seq_id: str) -> None:
        self._req.finish(seq_id, self.collection)
        self._active = [s for s in self._active if s != seq_id]
