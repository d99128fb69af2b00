"""The interface every cache policy implements. Pure Python: no torch, no I/O.

The same policy object runs inside the engine's offloading cache and inside the trace replay
(bench/replay.py). Both drive it one MoE layer at a time, in this order per forward pass:

    policy.begin_step(seq_ids)                          # which requests are in this pass
    for layer in range(num_layers):
        policy.hint(layer + 1, scores)                   # optional: engine-side gate look-ahead
        policy.observe(layer, routed)                    # routing of this layer, per request
                                                         # (cache/routing.py Routed)
        for key in policy.prefetch(layer, resident, n):  # what to load next, most urgent first
            ... when room is needed: victim = policy.victim(resident, pinned, layer)
                                     (or n at once: policy.victims(resident, pinned, layer, n))
    policy.end_request(seq_id)                           # a request finished (feeds the collection)

Keys are (layer, expert) tuples. ``resident`` includes experts in flight. Callers announce
every expert that becomes resident with ``on_load`` and every one that leaves with
``on_evict``: array-backed policies keep residency as a mask from those calls instead of
scanning ``resident`` on every decision.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Collection, Iterator, Mapping, Optional, Sequence

import numpy as np

ExpertKey = tuple[int, int]


def ranked_hint_ids(scores: Sequence[float], k: int) -> np.ndarray:
    """The look-ahead's k most likely experts [k] int64, most likely first (ties: lower id
    first). The one ranking both the policies' hint and the cache's protection of the next
    layer use."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]


class CachePolicy(ABC):
    name: ClassVar[str]

    def __init__(self, num_layers: int, num_experts: int, top_k: int) -> None:
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.top_k = top_k

    def begin_step(self, seq_ids: Sequence[str]) -> None:
        """A forward pass starts for these requests (a new request appears here first)."""

    @abstractmethod
    def observe(self, layer: int, routed: Mapping[str, Sequence[int]]) -> None:
        """Layer ``layer`` routed: per request, the expert ids its tokens chose (repeats count).
        Engine and replay pass a ``cache.routing.Routed``, whose ``prompt`` names the requests
        in a prompt pass; a plain mapping is accepted (prompt passes are then guessed)."""

    def hint(self, layer: int, scores: Sequence[float], ranked: Optional[np.ndarray] = None) -> None:
        """Optional look-ahead: a score per expert of a later ``layer`` (e.g. its router applied
        to the current hidden state); ``ranked``: ``ranked_hint_ids(scores, top_k)`` where the
        caller has it already (ranked once per layer). Policies that cannot use it ignore it."""

    def prefetch(self, layer: int, resident: Collection[ExpertKey], limit: int) -> list[ExpertKey]:
        """After ``layer`` routed: at most ``limit`` non-resident experts of later layers worth
        loading now, most urgent first. Default: none (demand loading only)."""
        return []

    @abstractmethod
    def victim(self, resident: Collection[ExpertKey], pinned: Collection[ExpertKey],
               layer: int) -> Optional[ExpertKey]:
        """The resident expert (not in ``pinned``) to evict to make room while at ``layer``;
        None if every resident expert is pinned."""

    def victims(self, resident: Collection[ExpertKey], pinned: Collection[ExpertKey],
                layer: int, n: int) -> list[ExpertKey]:
        """Up to ``n`` distinct victims at once, first to evict first (a batch's misses need
        many slots; array-backed policies answer in one pass). Default: ``victim`` n times."""
        out: list[ExpertKey] = []
        held = set(pinned)
        for _ in range(n):
            v = self.victim(resident, held, layer)
            if v is None:
                break
            out.append(v)
            held.add(v)
        return out

    def on_access(self, key: ExpertKey) -> None:
        """``key`` was used by a layer's compute (a hit or a completed miss)."""

    def on_load(self, key: ExpertKey) -> None:
        """``key`` became resident."""

    def on_evict(self, key: ExpertKey) -> None:
        """``key`` left the cache."""

    def end_request(self, seq_id: str) -> None:
        """A request finished; its activation matrix may enter the collection."""


class UnionKeys(Collection[ExpertKey]):
    """The keys of two disjoint dicts (resident, in flight) as one ``resident`` collection,
    without building a set per decision."""

    def __init__(self, a: dict, b: dict) -> None:
        self._a, self._b = a, b

    def __contains__(self, key: object) -> bool:
        return key in self._a or key in self._b

    def __len__(self) -> int:
        return len(self._a) + len(self._b)

    def __iter__(self) -> Iterator[ExpertKey]:
        yield from self._a
        yield from self._b
