"""What the expert cache did during one forward pass, for the rows that asked to see it (the
web chat's live expert view; off unless a request opts in, so the hot path pays one ``is None``
test per layer).

Pure Python (no torch). The provider fills a ``StepEvents`` while the pass runs; the engine reads
it afterwards and hands each watched sequence its share.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from cache.routing import StepRows

HIT, PREFETCHED, MISS = "h", "p", "m"   # resident; resident thanks to a prefetch; had to be loaded


@dataclass
class StepEvents:
    """Per watched sequence and MoE layer, expert -> [rows that chose it, cache status]; for the
    whole pass, the experts evicted and prefetched, bytes read from disk and stall time."""

    rows: StepRows
    watched: frozenset[str]
    num_layers: int
    routed: dict[str, list[dict[int, list]]] = field(default_factory=dict)
    evicted: list[tuple[int, int]] = field(default_factory=list)
    prefetched: list[tuple[int, int]] = field(default_factory=list)
    bytes_read: int = 0
    stall_seconds: float = 0.0
    resident: tuple[int, ...] = ()      # per MoE layer a bit mask of resident experts, at the end

    def __post_init__(self) -> None:
        for seq in self.watched:
            self.routed[seq] = [{} for _ in range(self.num_layers)]

    def route(self, layer: int, ids: Sequence[Sequence[int]]) -> None:
        """A layer's [T][k] routing for this pass's rows; counts kept for watched sequences."""
        start = 0
        for seq, n in zip(self.rows.seq_ids, self.rows.num_tokens):
            if seq in self.watched:
                counts = self.routed[seq][layer]
                for row in ids[start:start + n]:
                    for e in row:
                        counts.setdefault(int(e), [0, HIT])[0] += 1
            start += n

    def status(self, layer: int, expert: int, code: str) -> None:
        """What the cache did for ``expert`` of ``layer`` in this pass (same for every row)."""
        for per_seq in self.routed.values():
            entry = per_seq[layer].get(expert)
            if entry is not None:
                entry[1] = code


def masks(keys: Iterable[tuple[int, int]], num_layers: int) -> tuple[int, ...]:
    """Per layer, a bit mask with bit e set for every (layer, e) in ``keys``."""
    out = [0] * num_layers
    for layer, e in keys:
        out[layer] |= 1 << e
    return tuple(out)
