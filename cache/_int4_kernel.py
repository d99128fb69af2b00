"""quantize_int4's search (cache/quantizers.py) compiled with numba: the same grid, the same
candidates in the same order, each value computed in float32 as torch computes it, but one group
at a time instead of a dozen passes over temporaries of the whole matrix. numpy sorts the groups
for the grid (its vectorised sort is several times faster than numba's). numba as in
cache/policies/_auto_kernels.py; nogil, so that threads split the rows.

The sums (of the refit and of the squared error) are taken in float64 in any order, so that they
vectorise, and the refit's rounded to float32; torch sums in float32 in its own order. Where a
refit lands on a tie between two bf16 scales, that rounding decides, so a group can get the other
scale (4 of 8,192 groups of Q4_K-shaped weights in tests/cache/test_int4_kernel.py, none of the
other kinds there)."""
from __future__ import annotations

import numpy as np
from numba import njit

_ZERO, _EIGHT, _FIFTEEN = np.float32(0.0), np.float32(8.0), np.float32(15.0)
_MIN_SCALE = np.float32(1e-8)


@njit(inline="always")
def _bf16(x, f, u):  # type: ignore[no-untyped-def]
    """x rounded to the nearest bfloat16 (ties to even), as float32; f, u: one float32 and its
    uint32 view (scratch). Finite x only, as the weights are."""
    f[0] = x
    b = u[0]
    u[0] = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return f[0]


@njit(inline="always")
def _codes(x, scale, zero, q):  # type: ignore[no-untyped-def]
    """q[k] = round((x[k] - zero) / scale + 8) clamped to 0..15 (scale, zero already bf16)."""
    for k in range(x.shape[0]):
        q[k] = min(max(np.rint((x[k] - zero) / scale + _EIGHT), _ZERO), _FIFTEEN)


@njit(fastmath={"reassoc"})
def _sums(x, q):  # type: ignore[no-untyped-def]
    """sum(c), sum(c * c), sum(c * x) for c = q - 8, in float64. The terms are exact there (codes of
    4 bits times float32), so only the order of the additions is left free, which lets LLVM
    vectorise them."""
    sx = sxx = sxy = 0.0
    for k in range(x.shape[0]):
        c = np.float64(q[k] - _EIGHT)
        sx += c
        sxx += c * c
        sxy += c * np.float64(x[k])
    return sx, sxx, sxy


@njit(fastmath={"reassoc"})
def _sum(x):  # type: ignore[no-untyped-def]
    """sum(x) in float64 (exact terms, free order, as in _sums)."""
    s = 0.0
    for k in range(x.shape[0]):
        s += np.float64(x[k])
    return s


@njit(fastmath={"reassoc"})
def _square_sum(d):  # type: ignore[no-untyped-def]
    """sum(d * d) in float64 (exact terms, free order, as in _sums)."""
    e = 0.0
    for k in range(d.shape[0]):
        e += np.float64(d[k]) * np.float64(d[k])
    return e


@njit(inline="always")
def _refit(x, sy, q, scale, zero, f, u):  # type: ignore[no-untyped-def]
    """Least-squares scale, zero for the codes q (kept where the fit is degenerate), bf16-rounded;
    sy: the sum of x. The sums are rounded to float32, then the fit computed as torch computes it."""
    sx, sxx, sxy = _sums(x, q)
    sx32, sy32, sxx32, sxy32 = np.float32(sx), np.float32(sy), np.float32(sxx), np.float32(sxy)
    n32 = np.float32(x.shape[0])
    det = n32 * sxx32 - sx32 * sx32
    if det > _ZERO:
        s_new = (n32 * sxy32 - sx32 * sy32) / max(det, np.float32(1e-12))
        if s_new > _MIN_SCALE:
            scale, zero = s_new, (sy32 - s_new * sx32) / n32
    return _bf16(scale, f, u), _bf16(zero, f, u)


@njit(inline="always")
def _err(x, q, scale, zero, d):  # type: ignore[no-untyped-def]
    """The squared error of the codes q; d: scratch. Each difference in float32 as torch takes it."""
    for k in range(x.shape[0]):
        d[k] = (q[k] - _EIGHT) * scale + zero - x[k]
    return _square_sum(d)


@njit(nogil=True, cache=True)
def grid_rows(v, lo, hi, step, base):  # type: ignore[no-untyped-def]
    """quantizers._grid and _on_grid for rows of sorted groups v float32 [R, In/G, G]: writes
    lo, hi, step, base float32 [R, In/G]; returns whether every value lies on its group's grid
    (the check stops at the first that does not: on float weights, in the first group)."""
    size = v.shape[2]
    on_grid = True
    for r in range(v.shape[0]):
        for j in range(v.shape[1]):
            x = v[r, j]
            low, high = x[0], x[size - 1]
            tiny = (high - low) * np.float32(1e-3)        # gaps below this are one level rounded twice
            st = np.float32(np.inf)
            for k in range(size - 1):
                gap = x[k + 1] - x[k]
                if gap > tiny and gap < st:
                    st = gap
            if not np.isfinite(st):
                st = (high - low) / _FIFTEEN
            st = max(st, _MIN_SCALE)
            b = low + _EIGHT * st
            lo[r, j], hi[r, j], step[r, j], base[r, j] = low, high, st, b
            tolerance = np.float32(1e-2) * st + np.float32(1e-6) * abs(b)
            for k in range(size if on_grid else 0):
                c = np.rint((x[k] - b) / st + _EIGHT)
                if c < _ZERO or c > _FIFTEEN or abs((c - _EIGHT) * st + b - x[k]) > tolerance:
                    on_grid = False
                    break
    return on_grid


@njit(nogil=True, cache=True)
def search_rows(g, lo, hi, step, base, clips, keeps, on_grid, q_out, s_out, z_out):  # type: ignore[no-untyped-def]
    """quantizers._search for rows of groups g float32 [R, In/G, G]; lo, hi, step, base float32
    [R, In/G] (grid_rows'); clips float32 [C] and keeps = 1 - 2 * clips, rounded from float64 as
    torch rounds them (both unused when on_grid). Writes the winning codes into q_out uint8
    [R, In/G, G] and their bf16-valued scale, zero into s_out, z_out float32 [R, In/G]."""
    f = np.zeros(1, np.float32)
    u = f.view(np.uint32)
    size = g.shape[2]
    q = np.empty(size, np.float32)
    d = np.empty(size, np.float32)
    for r in range(g.shape[0]):
        for j in range(g.shape[1]):
            x, low, high = g[r, j], lo[r, j], hi[r, j]
            sy = _sum(x)
            best, best_s, best_z = np.inf, _ZERO, _ZERO
            for c in range(0 if on_grid else clips.shape[0]):
                scale = max((high - low) * keeps[c] / _FIFTEEN, _MIN_SCALE)
                zero = low + (high - low) * clips[c] + _EIGHT * scale
                _codes(x, _bf16(scale, f, u), _bf16(zero, f, u), q)
                scale, zero = _refit(x, sy, q, scale, zero, f, u)
                _codes(x, scale, zero, q)
                e = _err(x, q, scale, zero, d)
                if e < best:
                    best, best_s, best_z = e, scale, zero
            scale, zero = _bf16(step[r, j], f, u), _bf16(base[r, j], f, u)
            for last in range(2 if on_grid else 1):   # the grid, then (on a grid) its own refit
                if last:
                    scale, zero = _refit(x, sy, q, scale, zero, f, u)
                _codes(x, scale, zero, q)
                e = _err(x, q, scale, zero, d)
                if e < best:
                    best, best_s, best_z = e, scale, zero
            _codes(x, best_s, best_z, q)     # every candidate's codes are _codes of its scale, zero
            for k in range(size):
                q_out[r, j, k] = np.uint8(q[k])
            s_out[r, j], z_out[r, j] = best_s, best_z
