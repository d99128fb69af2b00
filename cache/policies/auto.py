"""``auto``: eviction and prefetch by estimated time to next use (an estimated Belady)."""
from __future__ import annotations

from typing import Collection, Mapping, Optional, Sequence

import numpy as np

from cache.eam import EAMCollection
from cache.policies import _auto_kernels as K
from cache.policies import _select_kernels as S
from cache.policies._tracking import RequestTracker, grow
from cache.policy import CachePolicy, ExpertKey, ranked_hint_ids

P_FLOOR = 1e-3
REFRESH_EVERY = 4      # decode passes between two matches of a request (after its first few)


class AutoPolicy(CachePolicy):
    """Keeps the experts needed soonest, as Belady would, with the future estimated.

    For each running request s and expert (i, j), a per-pass use probability
        p_s[i][j] = (n_s[i][j] + a * prior[i][j]) / (N_s[i] + a)
    where n_s counts the passes of s that used (i, j) (decayed by ``decay`` per pass: recent
    tokens weigh more), N_s the decayed number of passes, and the prior is k x pEAM (the
    collection matched against s, as in MoE-Infinity) mixed half and half with the global
    per-pass usage rate learned online (k x pEAM alone when there is no history).
    The probability q_s[i][j] that (i, j) is used at layer i's next access comes from online
    statistics of decode tokens: r_i(b) = (tokens choosing b at i + 1) / (tokens + E/k),
    cross-layer rates r_i(b | a) (a at i-1, same token), two-layer rates r_i(b | a) (a at i-2,
    same token) and temporal rates r_i(b | c) (c at i for the previous token), each smoothed as
    (count(a, b) + m r_i(b)) / (count(a) + m),
    m = ``smooth``. Naive Bayes over evidence experts a with weights w_a, damped by
    c = ``evidence_scale`` (default min(1, 2 / k)):
        score_i(b) = c^(1/4) log r_i(b) + c sum_a w_a (log r_i(b | a) - log r_i(b)),
        q_i = min(k softmax(score_i), 0.999).
    (The k experts of one token are strongly correlated evidence, so plain naive Bayes is
    overconfident when k is large; c = 1, plain naive Bayes, for top-1 and top-2 models.)
    After a decode token routed A at layer l: q_l (next token) from the temporal rates given A;
    q_{l+1} from the cross-layer rates given A (w = 1) and the temporal rates given the previous
    token's layer-(l+1) experts; q_{l+2} from the two-layer rates given A and the temporal rates
    (direct statistics: chaining through q_{l+1} would cost O(E^2) per layer). All three in one
    vectorised pass over the batch's decode requests.
    Rows not predicted yet (and prompt passes) use q = p. An engine ``hint`` (next router on
    the current hidden state) raises q of its r-th expert to the precision that rank has had so
    far (learned online, separately for one and several decode requests; p at least that q). Batches combine requests as
    q = 1 - prod_s (1 - q_s), p likewise.
    The expected time, in layer steps, until (i, j) is next used is
        t[i][j] = d(i) + (1 - q[i][j]) x L / max(p[i][j], eps),  d(i) = (i - l - 1) mod L + 1
    (the first chance at distance d, then a geometric number of passes).
    victim: the unpinned resident expert with the largest t (a masked argmax; only the rows
    whose estimate changed are recomputed per layer).
    prefetch: non-resident experts of the next ``lookahead`` layers (d <= lookahead) in
    increasing t, each only while its t is below ``margin`` x the t of the resident expert it
    would displace (the largest remaining): the link's time spent on far guesses is lost;
    and only those with q >= ``min_q`` (a guess below it is not worth the link's time).
    Defaults: decay 0.9, prior_weight 4, margin 0.85, nearest 3, smooth 2, lookahead 3, min_q 0.3.
    The per-layer loops (counts, predictions, estimates, victims, prefetch) run compiled, one
    call each (cache/policies/_auto_kernels.py, _select_kernels.py); the smoothed pair rates
    are kept as log-lifts over their prior, log(1 + count / (smooth r(b))), 0 for a pair never
    seen, with r(b) refreshed (counted entries only) as a layer's token count grows
    (REBUILD_GROWTH).
    """

    name = "auto"

    def __init__(self, num_layers: int, num_experts: int, top_k: int,
                 collection: Optional[EAMCollection] = None, *, decay: float = 0.9,
                 prior_weight: float = 4.0, margin: float = 0.85, nearest: int = 3,
                 smooth: float = 2.0, lookahead: int = 3, min_q: float = 0.3,
                 evidence_scale: Optional[float] = None) -> None:
        super().__init__(num_layers, num_experts, top_k)
        L, E = num_layers, num_experts
        self.collection = collection if collection is not None else EAMCollection(L, E)
        self.decay, self.prior_weight, self.margin, self.nearest = decay, prior_weight, margin, nearest
        self.smooth, self.lookahead, self.min_q = smooth, lookahead, min_q
        c = min(1.0, 2.0 / max(top_k, 1)) if evidence_scale is None else float(evidence_scale)
        self.evidence_scale = c
        self._base_w = c ** 0.25
        self._req = RequestTracker(L, E, top_k)
        self._active = np.zeros(0, dtype=np.int64)      # slots of this pass's requests
        self._slots = 0
        self._grow()
        self._glob_num = np.zeros((L, E))
        self._glob_den = np.zeros(L)
        # online routing statistics of decode tokens (one token per pass, so layers pair up):
        self._use = np.zeros((L, E))          # tokens that chose b at layer j
        self._tok = np.zeros(L)               # tokens seen at layer j
        self._lr = np.full((L, E), np.log(top_k / E))   # log r_j(b), kept by _auto_kernels.learn
        # pair counts c[j, block * E + a, b]: b chosen at layer j of a token, with evidence a
        # from block 0: a at j-1 (same token), 1: a at j-2 (same token), 2: a at j for the
        # previous token; kept as log-lifts lt = log(1 + c / (smooth r'_b)), r' (rs) the rates
        # of the last rebuild (_auto_kernels), 0 without a count. stat_n[j, block * E + a]
        # counts the evidence, ln = log(1 + stat_n / smooth). One table so that one pass
        # predicts three layers; zeros, so that pages never counted into stay unmapped.
        self._lt = np.zeros((L, 3 * E, E), dtype=np.float32)
        self._stat_n = np.zeros((L, 3 * E), dtype=np.float32)
        self._ln = np.zeros((L, 3 * E), dtype=np.float32)
        self._rs = np.full((L, E), np.float32(top_k / E), dtype=np.float32)
        # per layer and evidence row, the columns that hold a count (learn appends, the prior
        # shift recomputes only those)
        self._cols = np.zeros((L, 3 * E, E), dtype=_column_dtype(E))
        self._ncol = np.zeros((L, 3 * E), dtype=np.int32)
        self._built_at = np.zeros(L)
        self._p_all = np.full((L, E), P_FLOOR)
        self._hint: Optional[tuple[int, np.ndarray]] = None
        # hints to verify: the one given before this layer's observe (for the next layer)
        # becomes the one checked when that layer routes
        self._check: Optional[tuple[int, np.ndarray, int]] = None
        self._incoming: Optional[tuple[int, np.ndarray, int]] = None
        self._hint_hits = np.zeros((2, top_k))       # [batch 1 | several, rank]: hint then used
        self._hint_n = np.zeros(2)
        # the estimate without the distance term: t[i][j] = d(i) + rows.vals[i][j]
        self._vals = np.zeros((L, E))
        # residency (on_load / on_evict) and the row maxima of vals over resident experts,
        # recomputed for the rows marked dirty before a decision (_select_kernels.refresh)
        self._mask = np.zeros((L, E), dtype=bool)
        self._held = 0
        self._rowmax = np.full(L, -np.inf)
        self._rowarg = np.full(L, -1, dtype=np.int64)
        self._dirty = np.ones(L, dtype=bool)
        self._q_all = np.zeros((L, E))
        self._d = (np.arange(L)[None, :] - np.arange(L)[:, None] - 1) % L + 1.0   # [l, i] -> d
        self._prior_ok = np.zeros(self._slots, dtype=bool)
        # the layers prefetch looks at after each layer
        self._ahead = [np.array([(l + 1 + x) % L for x in range(min(lookahead, L))], dtype=np.int64)
                       for l in range(L)]
        _warm_up()

    def _grow(self) -> None:
        """Per-request state lives in slot arrays shaped like the tracker's."""
        n, L, E, k = self._req.capacity, self.num_layers, self.num_experts, self.top_k
        if n == self._slots:
            return
        self._num = grow(getattr(self, "_num", None), (n, L, E))      # decayed pass-use counts
        self._den = grow(getattr(self, "_den", None), (n, L))          # decayed pass counts
        self._prior = grow(getattr(self, "_prior", None), (n, L, E))
        self._q = grow(getattr(self, "_q", None), (n, L, E), fill=-1.0)    # -1: not predicted
        self._last = grow(getattr(self, "_last", None), (n, L, k), np.int64)  # last decode token
        self._last_w = grow(getattr(self, "_last_w", None), (n, L, k))        # 0: none / padding
        self._dec_at = grow(getattr(self, "_dec_at", None), (n,), np.int64, -1)  # last decode layer
        self._prior_ok = grow(getattr(self, "_prior_ok", None), (n,), bool)
        self._slots = n

    # --- tracking ----------------------------------------------------------------------------

    def begin_step(self, seq_ids: Sequence[str]) -> None:
        self._active = self._req.begin_step(seq_ids)
        self._grow()

    def hint(self, layer: int, scores: Sequence[float], ranked: Optional[np.ndarray] = None) -> None:
        if 0 <= layer < self.num_layers and len(scores) == self.num_experts:
            top = ranked_hint_ids(scores, self.top_k) if ranked is None else ranked  # most likely first
            self._hint = (layer, top)
            self._incoming = (layer, top, min(len(self._active), 2) - 1)  # checked when it routes

    def hint_precision(self, batch: int = 1) -> np.ndarray:
        """[k] how often the look-ahead's r-th expert was then used, for passes of one decode
        request (batch 1) or several: the hint's q, learned online (smoothed towards K.HINT_PRIOR)."""
        b = _hint_kind(batch)
        return np.array([K.hint_precision(self._hint_hits, self._hint_n, b, r)
                         for r in range(self.top_k)])

    def _verify_hint(self, layer: int, ids: np.ndarray, w: np.ndarray) -> None:
        """Count which ranks of the look-ahead for ``layer`` this decode pass used."""
        if self._check is None or self._check[0] != layer:
            return
        _, top, b = self._check
        if b >= 0:                      # a pass without decode rows counts nothing
            K.count_hint(self._hint_hits, self._hint_n, b, top, ids, w)

    def observe(self, layer: int, routed: Mapping[str, Sequence[int]]) -> None:
        b = self._req.observe(layer, routed)
        self._grow()
        known = set(self._active.tolist())
        extra = [s for _, s, _ in b.pro if s not in known] + \
            [s for s in b.dec_slots.tolist() if s not in known]
        if extra:           # observe without begin_step: start tracking anyway
            self._active = np.concatenate([self._active, np.array(extra, dtype=np.int64)])
        g = self.decay
        for _, s, ids in b.pro:          # prompt pass: per-token use rates, no token pairing
            tokens = max(1, len(ids) // self.top_k)
            use = np.minimum(np.bincount(ids, minlength=self.num_experts) / tokens, 1.0)
            self._num[s, layer] = self._num[s, layer] * g + use
            self._den[s, layer] = self._den[s, layer] * g + 1.0
            self._q[s] = -1.0
            self._last_w[s] = 0.0
            self._dec_at[s] = -1
        ds, ids, w = b.dec_slots, b.dec_ids, b.dec_w
        if not b.pro:
            self._verify_hint(layer, ids, w)
        self._check, self._incoming = self._incoming, None
        if len(ds):
            # decode pass: one token, so its routing pairs layer to layer and token to token
            self._learn(layer, ds, ids, w)
            self._predict(layer, ds, ids, w)
        self._score(layer)

    # --- the estimate ------------------------------------------------------------------------

    def _refresh_priors(self, layer: int) -> bool:
        """Matching costs most of a call (it reads the whole collection): once a request has a
        full decode pass its matrix moves slowly, so its prior is refreshed at layer 0 of each
        of its first REFRESH_EVERY passes and of every REFRESH_EVERY-th pass after (every layer
        during its first pass). Returns whether any prior changed."""
        act = self._active
        if not len(act):
            return False
        if layer == 0:
            passes = self._req.decode_passes[act]
            stale = act[(passes <= REFRESH_EVERY) | (passes % REFRESH_EVERY == 0) | ~self._prior_ok[act]]
        else:
            stale = act[~self._prior_ok[act]]
        if not len(stale):
            return False
        k, E = self.top_k, self.num_experts
        glob = np.where(self._glob_den[:, None] > 0,
                        self._glob_num / np.maximum(self._glob_den[:, None], 1e-9), k / E)
        slot_sid = {s: sid for sid, s in self._req.live.items()}
        full, part = [], []
        for s in stale.tolist():
            mat, seen = self._req.query(slot_sid[s])
            (full if seen is None else part).append((s, mat, seen))
        preds = self.collection.match_full([m for _, m, _ in full], self.nearest)
        preds += [self.collection.match(m, seen, self.nearest) for _, m, seen in part]
        for (s, _, seen), p in zip(full + part, preds):
            self._prior[s] = glob if p is None else 0.5 * np.minimum(p * k, 1.0) + 0.5 * glob
            self._prior_ok[s] = seen is None
        return True

    def _learn(self, layer: int, ds: np.ndarray, ids: np.ndarray, w: np.ndarray) -> None:
        """The pass counts of ``ids``, and this token's layers l-1 and l-2 (when this pass
        routed them as a decode) and the previous token's layer l as evidence for them (the
        three blocks of _stat)."""
        K.learn(self._num, self._den, self._glob_num, self._glob_den, self._lt, self._rs,
                self._cols, self._ncol, self._stat_n, self._ln, self._use, self._tok, self._lr,
                self._last, self._last_w, self._dec_at, layer, ds, ids, w, self.decay, self.smooth)
        K.rebuild_logs(self._lt, self._rs, self._cols, self._ncol, self._use, self._tok,
                       self._built_at, layer, self.top_k)

    def _predict(self, layer: int, ds: np.ndarray, ids: np.ndarray, w: np.ndarray) -> None:
        """After a decode token routed ``ids`` at ``layer``, per request, P(b chosen) for: the
        next token's layer ``layer`` (evidence: ``ids``, temporal block), this token's layer + 1
        (``ids`` through the l-1 block, the previous token's layer + 1 through the temporal
        block) and layer + 2 (``ids`` through the l-2 block, temporal). Naive Bayes: the
        log-rate log r(b) plus, per evidence expert a of weight w_a, w_a (log r(b | a) -
        log r(b)) (rates smoothed towards r(b) with ``smooth`` pseudo-tokens), the log-rate
        weighted c^(1/4) and the evidence c (c = ``evidence_scale``), normalised to sum to k
        (each at most 0.999). The evidence terms use the logs cached by _learn."""
        K.predict(self._q, self._lt, self._ln, self._lr, self._last,
                  self._last_w, self._dec_at, layer, ds, ids, w, self._base_w,
                  self.evidence_scale)

    def _score(self, layer: int) -> None:
        """Updates the rows whose estimate changed: all of them when a prior did, else the
        layer just routed and the two predicted ahead."""
        L = self.num_layers
        act = self._active
        full = self._refresh_priors(layer)
        lo, hi = (0, L) if full else (layer, min(layer + 3, L))
        K.score_rows(self._num, self._den, self._prior, self._q, act, lo, hi, self.prior_weight,
                     P_FLOOR, self._q_all, self._p_all, self._vals, L)
        self._dirty[lo:hi] = True
        if self._hint is not None:
            hl, top = self._hint
            if hl == layer + 1 and hl < hi:     # q of rank r: at least the precision r has had
                K.apply_hint(self._q_all, self._p_all, self._vals, hl, top, self._hint_hits,
                             self._hint_n, _hint_kind(len(act)), L)
            self._hint = None

    # --- decisions ---------------------------------------------------------------------------

    def on_load(self, key: ExpertKey) -> None:
        if not self._mask[key]:
            self._mask[key] = True
            self._held += 1
            self._dirty[key[0]] = True

    def on_evict(self, key: ExpertKey) -> None:
        if self._mask[key]:
            self._mask[key] = False
            self._held -= 1
            self._dirty[key[0]] = True

    def _sync(self, resident: Collection[ExpertKey]) -> None:
        """Residency rebuilt from the caller's set (on_load / on_evict were missed: a policy
        attached to a warm cache)."""
        self._mask[:] = False
        for key in resident:
            self._mask[key] = True
        self._held = int(self._mask.sum())
        self._dirty[:] = True

    def victim(self, resident: Collection[ExpertKey], pinned: Collection[ExpertKey],
               layer: int) -> Optional[ExpertKey]:
        out = self.victims(resident, pinned, layer, 1)
        return out[0] if out else None

    def victims(self, resident: Collection[ExpertKey], pinned: Collection[ExpertKey],
                layer: int, n: int) -> list[ExpertKey]:
        if n <= 0:
            return []
        if not self._held <= len(resident) <= self._held + len(pinned):
            self._sync(resident)
        pins = _flat(pinned, self.num_experts)
        for attempt in range(2):
            S.refresh(self._vals, self._mask, self._rowmax, self._rowarg, self._dirty)
            flat, _ = S.top(self._vals, self._mask, self._rowmax, self._rowarg,
                            self._d[layer % self.num_layers], pins, n)
            out = self._keys(flat)
            if attempt or all(key in resident for key in out):
                return out
            self._sync(resident)
        return out

    def prefetch(self, layer: int, resident: Collection[ExpertKey], limit: int) -> list[ExpertKey]:
        if limit <= 0:
            return []
        if len(resident) < self._held or (self._held == 0 and len(resident)):
            self._sync(resident)
        L = self.num_layers
        S.refresh(self._vals, self._mask, self._rowmax, self._rowarg, self._dirty)
        out = self._keys(S.prefetch(self._vals, self._mask, self._rowmax, self._rowarg,
                                    self._q_all, self._d[layer % L], self._ahead[layer % L],
                                    self.min_q, self.margin, limit))
        return [key for key in out if key not in resident]

    def _keys(self, flat: np.ndarray) -> list[ExpertKey]:
        E = self.num_experts
        return [(f // E, f % E) for f in flat.tolist()]

    def predicted(self, seq_id: str) -> Optional[np.ndarray]:
        """The request's P(used at each layer's next access) [L, E] (-1: not predicted)."""
        s = self._req.live.get(seq_id)
        return None if s is None else self._q[s].copy()

    def tracked(self, seq_id: str) -> bool:
        return seq_id in self._req.live

    def end_request(self, seq_id: str) -> None:
        s = self._req.finish(seq_id, self.collection)
        if s is None:
            return
        self._num[s] = self._prior[s] = 0.0
        self._den[s] = 0.0
        self._q[s] = -1.0
        self._last_w[s] = 0.0
        self._dec_at[s] = -1
        self._prior_ok[s] = False
        self._active = self._active[self._active != s]


_NONE = np.zeros(0, dtype=np.int64)
_warm = False


def _hint_kind(batch: int) -> int:
    """Which precision counts a pass of ``batch`` requests uses: 0 for one, 1 for several."""
    return min(max(batch, 1), 2) - 1


def _warm_up() -> None:
    """Runs every compiled loop once on a tiny policy, so that numba compiles them (or loads
    them from its cache) while the engine starts, not inside the first request's step (the
    first compile on a machine takes a few seconds)."""
    global _warm
    if _warm:
        return
    _warm = True
    p = AutoPolicy(3, 4, 2)
    p.begin_step(["warm-up"])
    for layer in range(3):
        p.hint(layer + 1, [0.4, 0.3, 0.2, 0.1])
        p.observe(layer, {"warm-up": [0, 1]})
        p.on_load((layer, 0))
        p.victims({(i, 0) for i in range(layer + 1)}, set(), layer, 1)
        p.prefetch(layer, {(i, 0) for i in range(layer + 1)}, 2)
    p.victims({(i, 0) for i in range(3)}, {(0, 0)}, 0, 2)
    # the prior shift runs only once a layer has seen REBUILD_MIN tokens: force one here, or its
    # first call (about 0.1 s to load, more to compile) lands inside a request's step
    for dtype in (np.uint8, np.uint16):     # the column lists of up to 256 experts, and more
        p._cols = p._cols.astype(dtype)
        p._tok[0] = p._built_at[0] + 2 * K.REBUILD_MIN
        p._learn(0, _NONE, np.zeros((0, p.top_k), dtype=np.int64), np.zeros((0, p.top_k)))


def _column_dtype(num_experts: int) -> type:
    """The smallest unsigned type that holds an expert id (column lists: one entry per pair)."""
    return np.uint8 if num_experts <= 256 else np.uint16


def _flat(keys: Collection[ExpertKey], num_experts: int) -> np.ndarray:
    """``keys`` as flat indices i * E + j, int64 (half the time of two arrays of i and j)."""
    if not keys:
        return _NONE
    return np.array([i * num_experts + j for i, j in keys], dtype=np.int64)
