"""Compiled inner loops of the ``auto`` policy (numba): one call per layer instead of dozens of
small numpy operations, whose fixed cost (~1-3 us each) was most of the policy's time at batch 1.

The math is the one documented in cache/policies/auto.py. Every function works in place on the
policy's arrays; shapes: S request slots, L layers, E experts, k top-k, B decode requests of
this pass, n = 3E evidence rows (block 0: the same token's expert a at layer j-1, block 1: at
j-2, block 2: the previous token's expert a at layer j).

numba was chosen because the work is a few short loops over small arrays per layer, which no
vectorised library call does without materialising [T, B, 2k, E] temporaries; ``cache=True``
compiles once per machine (a few seconds, on first use) and loads from the cache afterwards.
"""
from __future__ import annotations

import math

import numpy as np

from cache.policies._jit import njit

# the log-rate table of a layer is rebuilt when its token count grew by this factor since the
# last rebuild (and at least REBUILD_MIN tokens): the smoothing prior it holds drifts that little
REBUILD_GROWTH = 1.25
REBUILD_MIN = 32.0


@njit(cache=True)
def learn(num, den, glob_num, glob_den, lt, lms, cols, ncol, stat_n, ln, use, tok, lr, last,
          last_w, dec_at, layer, ds, ids, w, g, sm):
    """A decode pass routed ``ids`` [B, k] (weights ``w``) at ``layer`` for slots ``ds`` [B]:
    the per-request pass counts (num decayed by ``g``, den) and the global ones; the pairs
    (evidence a -> chosen b) of the three blocks. The pair counts c are kept only as their
    smoothed logs lt[layer, a, b] = log(c + sm r'_b) (r', the rates at the table's last
    rebuild), so a count w is added as lt = log(exp(lt) + w): one [L, 3E, E] table instead of
    counts and their logs (45 MB less at DeepSeek-V3's shape).
    A pair's first count appends b to row a's list of counted columns (cols[layer, a, :ncol]),
    which is all the prior shift has to recompute (an entry without a count equals lms[layer, b]).
    ln[layer, a] = log(stat_n + sm) likewise follows the evidence counts, and lr[layer] =
    log r(b) = log((use + 1) / (tok + E / k)) the layer's rates (predict reads them for the
    layers ahead, which this pass has not routed yet)."""
    E = use.shape[1]
    k = ids.shape[1]
    for bi in range(ds.shape[0]):
        s = ds[bi]
        for e in range(E):
            num[s, layer, e] *= g
        den[s, layer] = den[s, layer] * g + 1.0
        for n in range(k):
            num[s, layer, ids[bi, n]] += w[bi, n]
            glob_num[layer, ids[bi, n]] += w[bi, n]
            use[layer, ids[bi, n]] += w[bi, n]
        same = dec_at[s] == layer - 1
        for blk in range(3):
            if blk == 0:
                src, off, on = layer - 1, 0, same and layer >= 1
            elif blk == 1:
                src, off, on = layer - 2, E, same and layer >= 2
            else:
                src, off, on = layer, 2 * E, True
            if not on:
                continue
            for m in range(k):
                wa = last_w[s, src, m]
                if wa == 0.0:
                    continue
                a = last[s, src, m] + off
                stat_n[layer, a] += wa
                ln[layer, a] = math.log(stat_n[layer, a] + sm)
                for n in range(k):
                    b = ids[bi, n]
                    add = wa * w[bi, n]
                    if add == 0.0:
                        continue
                    # the pair's first count (a list never outgrows its row: counts are >= 1,
                    # so a counted entry never falls back to the prior's value)
                    if lt[layer, a, b] == lms[layer, b] and ncol[layer, a] < E:
                        cols[layer, a, ncol[layer, a]] = b
                        ncol[layer, a] += 1
                    lt[layer, a, b] = math.log(math.exp(lt[layer, a, b]) + add)
    tok[layer] += ds.shape[0]
    glob_den[layer] += ds.shape[0]
    for b in range(E):
        lr[layer, b] = math.log((use[layer, b] + 1.0) / (tok[layer] + E / k))


@njit(cache=True)
def predict(q, lt, ln, lrs, lr, last, last_w, dec_at,
            layer, ds, ids, w, base_w, c):
    """After a decode token routed ``ids`` at ``layer``: per request, P(b chosen) at the next
    token's ``layer`` (evidence: ids, block 2), this token's layer + 1 (ids through block 0, the
    previous token's layer + 1 through block 2) and layer + 2 (ids through block 1, block 2),
    naive Bayes damped by ``c`` (see auto.py), written into q[s, target]. Then records ids as
    the request's last token at ``layer``."""
    L, E = lr.shape
    k = ids.shape[1]
    acc = np.empty(E, dtype=np.float64)
    for t in range(3):
        j = layer + t
        if j >= L:
            break
        off = 2 * E if t == 0 else (t - 1) * E
        log_r = lr[j]
        for bi in range(ds.shape[0]):
            s = ds[bi]
            acc[:] = 0.0
            small = 0.0
            wsum = 0.0
            for m in range(2 * k):
                if m < k:
                    wa, a = w[bi, m], ids[bi, m] + off
                elif t > 0:
                    wa, a = last_w[s, j, m - k], last[s, j, m - k] + 2 * E
                else:
                    break                  # target l: the previous token's layer l is not evidence
                if wa == 0.0:
                    continue
                small += wa * ln[j, a]
                wsum += wa
                for b in range(E):
                    acc[b] += wa * lt[j, a, b]
            top = -np.inf
            for b in range(E):
                acc[b] = base_w * log_r[b] + c * (acc[b] - small - wsum * lrs[j, b])
                top = max(top, acc[b])
            tot = 0.0
            for b in range(E):
                acc[b] = math.exp(acc[b] - top)
                tot += acc[b]
            scale = k / tot
            for b in range(E):
                q[s, j, b] = min(acc[b] * scale, 0.999)
    for bi in range(ds.shape[0]):
        s = ds[bi]
        for n in range(k):
            last[s, layer, n] = ids[bi, n]
            last_w[s, layer, n] = w[bi, n]
        dec_at[s] = layer


@njit(cache=True)
def score_rows(num, den, prior, q, act, lo, hi, a, p_floor, q_all, p_all, vals,
               num_layers):
    """Rows lo..hi-1 of the batch estimate: per request p = (num + a prior) / (den + a) and q
    (p where not predicted), combined as 1 - prod_s (1 - x); vals = (1 - q) L / max(p, floor).
    p_all[i] keeps the combined p of row i (the hint adjusts against it). Experts are the
    inner loop (contiguous, vectorised), one request after another."""
    E = num.shape[2]
    S = act.shape[0]
    np_ = np.ones(E)            # S == 1: p and q themselves; else prod_s (1 - p), (1 - q)
    nq = np.ones(E)
    for i in range(lo, hi):
        for r in range(S):
            s = act[r]
            inv = den[s, i] + a
            for e in range(E):
                x = (num[s, i, e] + a * prior[s, i, e]) / inv
                y = q[s, i, e]
                if y < 0.0:
                    y = x
                if S == 1:
                    np_[e] = x
                    nq[e] = y
                elif r == 0:
                    np_[e] = 1.0 - x
                    nq[e] = 1.0 - y
                else:
                    np_[e] *= 1.0 - x
                    nq[e] *= 1.0 - y
        for e in range(E):
            if S == 0:
                pp, qq = 0.0, 0.0
            elif S == 1:
                pp, qq = np_[e], nq[e]
            else:
                pp, qq = 1.0 - np_[e], 1.0 - nq[e]
            pp = max(pp, p_floor)
            q_all[i, e] = qq
            p_all[i, e] = pp
            vals[i, e] = (1.0 - qq) * num_layers / pp


@njit(cache=True)
def count_hint(hits, n, b, top, ids, w):
    """A decode pass routed ``ids`` [B, k] (padding: w == 0) at the layer the look-ahead ``top``
    [k'] (most likely first) was for: hits[b, r] += 1 where the pass used top[r], and n[b] += 1
    (nothing when the pass has no ids)."""
    valid = 0
    for i in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            if w[i, j] > 0.0:
                valid += 1
    if valid == 0:
        return
    for r in range(top.shape[0]):
        for i in range(ids.shape[0]):
            done = False
            for j in range(ids.shape[1]):
                if w[i, j] > 0.0 and ids[i, j] == top[r]:
                    hits[b, r] += 1.0
                    done = True
                    break
            if done:
                break
    n[b] += 1.0


HINT_PRIOR = 0.8      # a rank's precision before any evidence, worth HINT_PRIOR_N passes
HINT_PRIOR_N = 4.0


@njit(cache=True)
def hint_precision(hits, n, b, r):
    """How often rank r of the look-ahead was then used, in passes of kind b (0: one decode
    request, 1: several; counted by count_hint), smoothed towards HINT_PRIOR."""
    return (hits[b, r] + HINT_PRIOR_N * HINT_PRIOR) / (n[b] + HINT_PRIOR_N)


@njit(cache=True)
def apply_hint(q_all, p_all, vals, hl, top, hits, n, b, num_layers):
    """The look-ahead's r-th expert top[r] of layer ``hl`` is used with the precision its rank
    has had (hint_precision): q at least that, and its per-pass rate at least q
    (vals = (1 - q) L / max(p, q))."""
    for r in range(top.shape[0]):
        e = top[r]
        qh = max(q_all[hl, e], hint_precision(hits, n, b, r))
        q_all[hl, e] = qh
        vals[hl, e] = (1.0 - qh) * num_layers / max(p_all[hl, e], qh)


def rebuild_logs(lt: np.ndarray, rs: np.ndarray, lrs: np.ndarray, lms: np.ndarray,
                 cols: np.ndarray, ncol: np.ndarray, use: np.ndarray, tok: np.ndarray,
                 built_at: np.ndarray, layer: int, sm: float, k: int) -> None:
    """Moves layer ``layer``'s smoothing prior to the current rates when its token count has
    grown enough since the last rebuild: lt = log(exp(lt) - sm r'_old + sm r'_new) (a few per
    thousand tokens). ``lms`` [L, E] holds log(sm r'), the value of every entry without a count."""
    t = float(tok[layer])
    if t - built_at[layer] < max(REBUILD_MIN, (REBUILD_GROWTH - 1.0) * built_at[layer]):
        return
    E = use.shape[1]
    r = ((use[layer] + 1.0) / (t + E / k)).astype(np.float32)                 # [E]
    _shift_prior(lt[layer], cols[layer], ncol[layer], lms[layer], rs[layer], r, np.float32(sm))
    rs[layer] = r
    lrs[layer] = np.log(r)
    built_at[layer] = t


@njit(cache=True)
def _shift_prior(lt, cols, ncol, lms, r_old, r_new, sm):
    """One layer's table lt [3E, E] moved from the prior sm r_old to sm r_new. Entries without
    a count hold lms[b] exactly: each row is overwritten with the new prior's log (a contiguous
    copy), and only its counted columns (cols[a, :ncol[a]], kept by learn) are recomputed as
    log(exp(lt) + sm (r_new - r_old)), from their values saved before the copy."""
    E = lt.shape[1]
    new = np.empty(E, dtype=np.float32)
    for b in range(E):
        new[b] = math.log(sm * r_new[b])
    saved = np.empty(E, dtype=np.float32)
    for a in range(lt.shape[0]):
        n = ncol[a]
        for t in range(n):
            saved[t] = lt[a, cols[a, t]]
        lt[a, :] = new
        for t in range(n):      # a count never below 0 (float rounding)
            b = cols[a, t]
            lt[a, b] = math.log(max(math.exp(saved[t]) + sm * (r_new[b] - r_old[b]), sm * r_new[b]))
    lms[:] = new


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
def top(vals, mask, rowmax, rowarg, d, pinned_i, pinned_j, n):
    """Flat indices (i * E + j) of up to ``n`` resident, unpinned experts with the largest
    vals[i, j] + d[i], largest first (ties: lower index first), and those values. Row maxima
    (current: ``refresh`` first) choose the row; only the rows an answer or a pin touched are
    rescanned. ``mask`` is restored before returning."""
    L, E = vals.shape
    rmax, rarg = rowmax.copy(), rowarg.copy()
    cleared = np.empty(pinned_i.shape[0] + n, dtype=np.int64)   # entries taken out meanwhile
    c = 0
    for p in range(pinned_i.shape[0]):
        i, j = pinned_i[p], pinned_j[p]
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
    _, held = top(vals, mask, rowmax, rowarg, d, none, none, limit)
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
