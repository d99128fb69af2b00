"""Compiled victim and prefetch selection of the ``auto`` policy (numba): from per-layer row
maxima of the estimate ``vals`` [L, E] over resident experts (``mask``), kept current for the
rows marked dirty, so a decision scans L maxima and rescans only the rows it touches.
Shapes and math as in cache/policies/auto.py; numba as in cache/policies/_auto_kernels.py."""
from __future__ import annotations

import numpy as np

from cache.policies._jit import njit


@njit(cache=True)
def _rescan(vals, mask, rowmax, rowarg, i):
    """Row i's largest resident vals and where (-inf, -1 when none); ties: lower j."""
    top, at = -np.inf, -1
    for j in range(vals.shape[1]):
        if mask[i, j] and vals[i, j] > top:
            top, at = vals[i, j], j
    rowmax[i], rowarg[i] = top, at


@njit(cache=True)
def refresh(vals, mask, rowmax, rowarg, dirty):
    """Recomputes the row maxima of the rows marked dirty (their vals or residency changed)."""
    for i in range(vals.shape[0]):
        if dirty[i]:
            _rescan(vals, mask, rowmax, rowarg, i)
            dirty[i] = False


@njit(cache=True)
def top(vals, mask, rowmax, rowarg, d, pinned, n):
    """Flat indices (i * E + j) of up to ``n`` resident experts not in ``pinned`` (flat
    indices too) with the largest
    vals[i, j] + d[i], largest first (ties: lower index first), and those values. Row maxima
    (current: ``refresh`` first) choose the row; only the rows an answer or a pin touched are
    rescanned. ``mask`` is restored before returning."""
    L, E = vals.shape
    rmax, rarg = rowmax.copy(), rowarg.copy()
    cleared = np.empty(pinned.shape[0] + n, dtype=np.int64)   # entries taken out meanwhile
    c = 0
    for p in range(pinned.shape[0]):
        i, j = pinned[p] // E, pinned[p] % E
        if mask[i, j]:
            mask[i, j] = False
            cleared[c] = i * E + j
            c += 1
    for p in range(c):               # a row's maximum changes only when its argmax was pinned
        i = cleared[p] // E
        if rarg[i] == cleared[p] % E:
            _rescan(vals, mask, rmax, rarg, i)
    out = np.empty(n, dtype=np.int64)
    got = np.empty(n, dtype=np.float64)
    m = 0
    while m < n:
        best, at = -np.inf, -1
        for i in range(L):
            if rarg[i] >= 0 and rmax[i] + d[i] > best:
                best, at = rmax[i] + d[i], i
        if at < 0:
            break
        out[m], got[m] = at * E + rarg[at], best
        m += 1
        mask[at, rarg[at]] = False
        cleared[c] = out[m - 1]
        c += 1
        _rescan(vals, mask, rmax, rarg, at)
    for p in range(c):
        mask[cleared[p] // E, cleared[p] % E] = True
    return out[:m], got[:m]


@njit(cache=True)
def prefetch(vals, mask, rowmax, rowarg, q_all, d, rows, min_q, margin,
             limit):
    """Flat indices of up to ``limit`` non-resident experts of ``rows`` with q >= min_q, in
    increasing expected time t = d + vals, each only while its t is below ``margin`` x the t of
    the resident expert it would displace (the largest remaining)."""
    E = vals.shape[1]
    none = np.empty(0, dtype=np.int64)
    _, held = top(vals, mask, rowmax, rowarg, d, none, limit)
    cand = np.empty(rows.shape[0] * E, dtype=np.int64)
    t = np.empty(rows.shape[0] * E, dtype=np.float64)
    c = 0
    for r in rows:
        for j in range(E):
            if q_all[r, j] >= min_q and not mask[r, j]:
                cand[c] = r * E + j
                t[c] = d[r] + vals[r, j]
                c += 1
    order = np.argsort(t[:c], kind="mergesort")
    out = np.empty(min(limit, c), dtype=np.int64)
    m = 0
    for x in order:
        if m >= held.shape[0] or m >= limit:
            break
        if not t[x] < margin * held[m]:
            break
        out[m] = cand[x]
        m += 1
    return out[:m]
