"""Resident experts as a mask over an [L, E] score array, with per-row maxima kept lazily.

A policy writes its per-expert eviction score into ``vals`` (larger = evict sooner), marks the
rows it changed with ``touch``, and asks for the best unpinned resident expert. Only touched
rows are rescanned (one vectorised pass over them), so a victim costs O(L + E) instead of a
Python loop over every resident expert. Residency follows on_load / on_evict; ``sync`` rebuilds
it from a caller's resident set when the two disagree (a policy attached to a warm cache).
"""
from __future__ import annotations

from typing import Collection, Optional

import numpy as np

from cache.policy import ExpertKey


class MaskedRows:
    def __init__(self, num_layers: int, num_experts: int, dtype: type = np.float64) -> None:
        self.L, self.E = num_layers, num_experts
        self.vals = np.zeros((num_layers, num_experts), dtype=dtype)
        self.mask = np.zeros((num_layers, num_experts), dtype=bool)
        self.n = 0
        self._low = -np.inf if np.issubdtype(self.vals.dtype, np.floating) \
            else np.iinfo(self.vals.dtype).min
        self._rowmax = np.full(num_layers, self._low, dtype=self.vals.dtype)
        self._rowarg = np.zeros(num_layers, dtype=np.int64)
        self._dirty: set[int] = set()
        self._all_dirty = False

    # --- residency ---------------------------------------------------------------------------
    def load(self, key: ExpertKey) -> None:
        if not self.mask[key]:
            self.mask[key] = True
            self.n += 1
            self._dirty.add(key[0])

    def evict(self, key: ExpertKey) -> None:
        if self.mask[key]:
            self.mask[key] = False
            self.n -= 1
            self._dirty.add(key[0])

    def sync(self, resident: Collection[ExpertKey]) -> None:
        self.mask[:] = False
        for key in resident:
            self.mask[key] = True
        self.n = int(self.mask.sum())
        self._all_dirty = True

    # --- scores ------------------------------------------------------------------------------
    def touch(self, row: int) -> None:
        self._dirty.add(row)

    def touch_all(self) -> None:
        self._all_dirty = True

    def _refresh(self) -> None:
        if self._all_dirty:
            rows: object = slice(None)
        elif self._dirty:
            rows = np.fromiter(self._dirty, dtype=np.int64, count=len(self._dirty))
        else:
            return
        m = np.where(self.mask[rows], self.vals[rows], self._low)
        arg = m.argmax(axis=1)
        self._rowarg[rows] = arg
        self._rowmax[rows] = np.take_along_axis(m, arg[:, None], axis=1)[:, 0]
        self._dirty.clear()
        self._all_dirty = False

    def _row_scores(self, offset: Optional[np.ndarray]) -> np.ndarray:
        """Per row: its best resident vals (+ offset); ``self._low`` for rows with none. Stays
        in the vals dtype without an offset (int64 scores keep every bit)."""
        self._refresh()
        if offset is None:
            return self._rowmax.copy()
        return np.where(self._rowmax == self._low, -np.inf, self._rowmax + offset)

    def best(self, pinned: Collection[ExpertKey],
             offset: Optional[np.ndarray] = None) -> Optional[ExpertKey]:
        """The resident, unpinned expert with the largest vals[i, j] + offset[i]."""
        score = self._row_scores(offset)
        by_row: dict[int, list[int]] = {}
        for i, j in pinned:
            by_row.setdefault(i, []).append(j)
        fixed: dict[int, int] = {}        # rows rescanned without their pinned experts
        low = score.dtype.type(-np.inf) if offset is not None else self._low
        while True:
            i = int(score.argmax())
            if score[i] == low:
                return None
            if i in fixed or i not in by_row:
                return (i, fixed.get(i, int(self._rowarg[i])))
            keep = self.mask[i].copy()
            keep[by_row[i]] = False
            if not keep.any():
                score[i] = low
                fixed[i] = -1
                continue
            row = np.where(keep, self.vals[i], self._low)
            j = int(row.argmax())
            fixed[i] = j
            score[i] = row[j] if offset is None else row[j] + offset[i]

    def top(self, m: int, offset: Optional[np.ndarray] = None) -> np.ndarray:
        """The ``m`` largest vals + offset over resident experts, descending (fewer if fewer)."""
        score = self._row_scores(offset)
        m = min(m, self.n)
        if m <= 0:
            return np.zeros(0)
        # the m largest entries lie in the m rows with the largest maxima
        rows = np.argpartition(-score, m - 1)[:m] if m < self.L else np.arange(self.L)
        v = np.where(self.mask[rows], self.vals[rows], self._low).astype(np.float64)
        if offset is not None:
            v = v + offset[rows][:, None]
        v = v[self.mask[rows]]
        return -np.sort(-v)[:m]

    def best_n(self, pinned: Collection[ExpertKey], n: int,
               offset: Optional[np.ndarray] = None) -> list[ExpertKey]:
        """The ``n`` resident, unpinned experts with the largest vals + offset, largest first."""
        if n <= 0 or self.n == 0:
            return []
        if n <= 2:          # a row-wise pick or two beats one pass over the whole mask
            out: list[ExpertKey] = []
            held = set(pinned)
            for _ in range(n):
                key = self.best(held, offset)
                if key is None:
                    break
                out.append(key)
                held.add(key)
            return out
        keep = self.mask
        if pinned:
            keep = keep.copy()
            pi, pj = zip(*pinned)
            keep[list(pi), list(pj)] = False
        # only the resident entries: a partition over a mostly-sentinel array degenerates
        cand = np.flatnonzero(keep)
        m = self.vals.ravel()[cand]
        if offset is not None:
            m = m + offset[cand // self.E]
        n = min(n, m.size)
        if n == 0:
            return []
        sel = np.argpartition(m, m.size - n)[m.size - n:] if n < m.size else np.arange(m.size)
        idx = cand[sel[np.argsort(m[sel], kind="stable")[::-1]]]
        return [divmod(int(f), self.E) for f in idx]
