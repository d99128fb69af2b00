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
def learn(num, den, glob_num, glob_den, lt, rs, cols, ncol, stat_n, ln, use, tok, lr, last,
          last_w, dec_at, layer, ds, ids, w, g, sm):
    """A decode pass routed ``ids`` [B, k] (weights ``w``) at ``layer`` for slots ``ds`` [B]:
    the per-request pass counts (num decayed by ``g``, den) and the global ones; the pairs
    (evidence a -> chosen b) of the three blocks. The pair counts c are kept only as their
    log-lifts over the smoothing prior, lt[layer, a, b] = log(1 + c / (sm r'_b)) (r' = rs, the
    rates at the table's last rebuild), so a count w is added as lt = log(exp(lt) + w / (sm r'_b)):
    one [L, 3E, E] table instead of counts and their logs (45 MB less at DeepSeek-V3's shape),
    and an entry without a count is exactly 0, whatever the prior.
    A pair's first count appends b to row a's list of counted columns (cols[layer, a, :ncol]),
    which is all the prior shift has to recompute.
    ln[layer, a] = log(1 + stat_n / sm) likewise follows the evidence counts, and lr[layer] =
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
                ln[layer, a] = math.log(1.0 + stat_n[layer, a] / sm)
                for n in range(k):
                    b = ids[bi, n]
                    add = wa * w[bi, n]
                    if add == 0.0:
                        continue
                    # the pair's first count (a list never outgrows its row: a counted
                    # entry is > 0 and stays so)
                    if lt[layer, a, b] == 0.0 and ncol[layer, a] < E:
                        cols[layer, a, ncol[layer, a]] = b
                        ncol[layer, a] += 1
                    lift = add / (sm * rs[layer, b])
                    lt[layer, a, b] = math.log(math.exp(lt[layer, a, b]) + lift)
    tok[layer] += ds.shape[0]
    glob_den[layer] += ds.shape[0]
    for b in range(E):
        lr[layer, b] = math.log((use[layer, b] + 1.0) / (tok[layer] + E / k))


def predict(q: np.ndarray, lt: np.ndarray, ln: np.ndarray, lr: np.ndarray, last: np.ndarray,
            last_w: np.ndarray, dec_at: np.ndarray, layer: int, ds: np.ndarray, ids: np.ndarray,
            w: np.ndarray, base_w: float, c: float, compiled: bool = True) -> None:
    """After a decode token routed ``ids`` at ``layer``: per request, P(b chosen) at the next
    token's ``layer`` (evidence: ids, block 2), this token's layer + 1 (ids through block 0, the
    previous token's layer + 1 through block 2) and layer + 2 (ids through block 1, block 2),
    naive Bayes damped by ``c`` (see auto.py), written into q[s, target]. An evidence term
    log r(b | a) - log r'(b) = log((c + sm r'_b) / (n_a + sm)) - log r'_b is lt[a, b] - ln[a].
    Then records ids as the request's last token at ``layer``. The exps run in one numpy call
    between two compiled loops: numpy's vectorised exp is ~5x faster than numba's scalar one
    (3 x B x E of them per layer). ``compiled=False`` runs the loops interpreted (tests)."""
    scores_fn, finish_fn = (_scores, _finish) if compiled else (_scores.py_func, _finish.py_func)
    out = np.empty((3, ds.shape[0], lr.shape[1]))          # [target, B, E]
    n = scores_fn(out, lt, ln, lr, last, last_w, layer, ds, ids, w, base_w, c)
    np.exp(out[:n], out=out[:n])
    finish_fn(q, out, n, last, last_w, dec_at, layer, ds, ids, w)


@njit(cache=True)
def _scores(out, lt, ln, lr, last, last_w, layer, ds, ids, w, base_w, c):
    """out[t, bi] = the naive-Bayes scores of request ds[bi] for target layer + t, minus their
    maximum; returns the number of targets (fewer near the last layer)."""
    L, E = lr.shape
    k = ids.shape[1]
    ev_w = np.empty(2 * k, dtype=np.float64)     # this request's evidence rows and weights
    ev_a = np.empty(2 * k, dtype=np.int64)
    n = 0
    for t in range(3):
        j = layer + t
        if j >= L:
            break
        n += 1
        off = 2 * E if t == 0 else (t - 1) * E
        log_r = lr[j]
        for bi in range(ds.shape[0]):
            s = ds[bi]
            ne = 0
            for m in range(2 * k):
                if m < k:
                    wa, a = w[bi, m], ids[bi, m] + off
                elif t > 0:
                    wa, a = last_w[s, j, m - k], last[s, j, m - k] + 2 * E
                else:
                    break                  # target l: the previous token's layer l is not evidence
                if wa != 0.0:
                    ev_w[ne], ev_a[ne] = wa, a
                    ne += 1
            acc = out[t, bi]
            acc[:] = 0.0
            small = 0.0
            m = 0
            while m + 4 <= ne:      # four table rows at a time: their cold reads overlap
                w0, w1, w2, w3 = ev_w[m], ev_w[m + 1], ev_w[m + 2], ev_w[m + 3]
                r0, r1 = lt[j, ev_a[m]], lt[j, ev_a[m + 1]]
                r2, r3 = lt[j, ev_a[m + 2]], lt[j, ev_a[m + 3]]
                for b in range(E):  # (summed in evidence order, as one row at a time would)
                    acc[b] = (((acc[b] + w0 * r0[b]) + w1 * r1[b]) + w2 * r2[b]) + w3 * r3[b]
                m += 4
            while m < ne:
                wa, row = ev_w[m], lt[j, ev_a[m]]
                for b in range(E):
                    acc[b] += wa * row[b]
                m += 1
            for m in range(ne):
                small += ev_w[m] * ln[j, ev_a[m]]
            top = -np.inf
            for b in range(E):
                acc[b] = base_w * log_r[b] + c * (acc[b] - small)
                top = max(top, acc[b])
            for b in range(E):
                acc[b] -= top
    return n


@njit(cache=True)
def _finish(q, ex, n, last, last_w, dec_at, layer, ds, ids, w):
    """q[s, layer + t] = k softmax (each at most 0.999) from the exps ``ex`` [3, B, E] of the
    first n targets; then ids become the requests' last token at ``layer``."""
    k = ids.shape[1]
    E = ex.shape[2]
    for t in range(n):
        for bi in range(ds.shape[0]):
            s = ds[bi]
            tot = 0.0
            for b in range(E):
                tot += ex[t, bi, b]
            scale = k / tot
            for b in range(E):
                q[s, layer + t, b] = min(ex[t, bi, b] * scale, 0.999)
    for bi in range(ds.shape[0]):
        s = ds[bi]
        for m in range(k):
            last[s, layer, m] = ids[bi, m]
            last_w[s, layer, m] = w[bi, m]
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


def rebuild_logs(lt: np.ndarray, rs: np.ndarray, cols: np.ndarray, ncol: np.ndarray,
                 use: np.ndarray, tok: np.ndarray, built_at: np.ndarray, layer: int,
                 k: int) -> None:
    """Moves layer ``layer``'s smoothing prior to the current rates when its token count has
    grown enough since the last rebuild: lt = log(1 + c / (sm r'_new)) with the count
    c = sm r'_old (exp(lt) - 1), for the counted entries only (uncounted ones stay 0)."""
    t = float(tok[layer])
    if t - built_at[layer] < max(REBUILD_MIN, (REBUILD_GROWTH - 1.0) * built_at[layer]):
        return
    E = use.shape[1]
    r = ((use[layer] + 1.0) / (t + E / k)).astype(np.float32)                 # [E]
    _shift_prior(lt[layer], cols[layer], ncol[layer], rs[layer], r)
    rs[layer] = r
    built_at[layer] = t


@njit(cache=True)
def _shift_prior(lt, cols, ncol, r_old, r_new):
    """One layer's table lt [3E, E] moved from the prior sm r_old to sm r_new: only the counted
    columns of each row (cols[a, :ncol[a]], kept by learn) change, to
    log(1 + (exp(lt) - 1) r_old / r_new) (sm cancels)."""
    E = lt.shape[1]
    ratio = np.empty(E, dtype=np.float64)
    for b in range(E):
        ratio[b] = np.float64(r_old[b]) / np.float64(r_new[b])
    saved = np.empty(E, dtype=np.float32)
    for a in range(lt.shape[0]):
        n = ncol[a]
        for t in range(n):      # the row's loads first: they overlap, where the math would not
            saved[t] = lt[a, cols[a, t]]
        for t in range(n):
            b = cols[a, t]
            # (exp and log: numba's log1p / expm1 are ~2.5x slower; float64 keeps the float32
            # entry exact enough)
            lt[a, b] = math.log(1.0 + (math.exp(saved[t]) - 1.0) * ratio[b])
