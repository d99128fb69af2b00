"""``auto``: eviction and prefetch by estimated time to next use (an estimated Belady)."""
from __future__ import annotations

from typing import Collection, Mapping, Optional, Sequence

import numpy as np

from cache.eam import EAMCollection
from cache.policies._tracking import RequestTracker
from cache.policy import CachePolicy, ExpertKey

P_FLOOR = 1e-3


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
    cross-layer rates r_i(b | a) (a at i-1, same token) and temporal rates r_i(b | c) (c at i
    for the previous token), each smoothed as (count(a, b) + m r_i(b)) / (count(a) + m),
    m = ``smooth``. Naive Bayes over evidence experts a with weights w_a, damped by
    c = ``evidence_scale`` (default min(1, 2 / k)):
        score_i(b) = c^(1/4) log r_i(b) + c sum_a w_a (log r_i(b | a) - log r_i(b)),
        q_i = min(k softmax(score_i), 0.999).
    (The k experts of one token are strongly correlated evidence, so plain naive Bayes is
    overconfident when k is large; c = 1, plain naive Bayes, for top-1 and top-2 models.)
    After a decode token routed A at layer l: q_l (next token) from the temporal rates given A;
    q_{l+1} from the cross-layer rates given A (w = 1) and the temporal rates given the previous
    token's layer-(l+1) experts; q_{l+2} likewise, its cross-layer evidence weighted by q_{l+1}.
    Rows not predicted yet (and prompt passes) use q = p. An engine ``hint`` (next router on
    the current hidden state) sets q = 1 on its top-k. Batches combine requests as
    q = 1 - prod_s (1 - q_s), p likewise.
    The expected time, in layer steps, until (i, j) is next used is
        t[i][j] = d(i) + (1 - q[i][j]) x L / max(p[i][j], eps),  d(i) = (i - l - 1) mod L + 1
    (the first chance at distance d, then a geometric number of passes).
    victim: the unpinned resident expert with the largest t.
    prefetch: non-resident experts of the next ``lookahead`` layers (d <= lookahead) in
    increasing t, each only while its t is below ``margin`` x the t of the resident expert it
    would displace (the largest remaining): the link's time spent on far guesses is lost;
    and only those with q >= ``min_q`` (a guess below it is not worth the link's time).
    Defaults: decay 0.9, prior_weight 4, margin 0.85, nearest 3, smooth 2, lookahead 3, min_q 0.3.
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
        self._active: list[str] = []
        # per request: decayed pass-use counts [L, E] and decayed pass counts [L]
        self._num: dict[str, np.ndarray] = {}
        self._den: dict[str, np.ndarray] = {}
        self._glob_num = np.zeros((L, E))
        self._glob_den = np.zeros(L)
        # online routing statistics of decode tokens (one token per pass, so layers pair up):
        self._use = np.zeros((L, E))          # tokens that chose b at layer j
        self._tok = np.zeros(L)               # tokens seen at layer j
        self._cross = np.zeros((L, E, E))     # [j, a, b]: a at j-1 -> b at j, same token
        self._cross_n = np.zeros((L, E))      # [j, a]: tokens with a at j-1 (and a layer j)
        self._temp = np.zeros((L, E, E))      # [j, c, b]: c at j for the previous token -> b at j
        self._temp_n = np.zeros((L, E))
        self._prev: dict[str, list[int]] = {}                # this pass's previous layer routing
        self._last: dict[str, list[Optional[list[int]]]] = {}  # last decode token's routing, per layer
        self._q: dict[str, np.ndarray] = {}   # per request: P(used at the layer's next access)
        self._prior_cache: dict[str, np.ndarray] = {}
        self._hint: Optional[tuple[int, np.ndarray]] = None
        self._t: list[list[float]] = [[0.0] * E for _ in range(L)]
        self._t_arr = np.zeros((L, E))
        self._layer_idx = np.arange(L)

    # --- tracking ----------------------------------------------------------------------------

    def begin_step(self, seq_ids: Sequence[str]) -> None:
        self._active = list(seq_ids)
        self._req.begin_step(seq_ids)
        for sid in seq_ids:
            if sid not in self._num:
                self._num[sid] = np.zeros((self.num_layers, self.num_experts))
                self._den[sid] = np.zeros(self.num_layers)

    def hint(self, layer: int, scores: Sequence[float]) -> None:
        if 0 <= layer < self.num_layers and len(scores) == self.num_experts:
            self._hint = (layer, np.asarray(scores, dtype=np.float64))

    def observe(self, layer: int, routed: Mapping[str, Sequence[int]]) -> None:
        self._req.observe(layer, routed)
        if not self._active:
            self._active = list(routed)
        k, g = self.top_k, self.decay
        for sid, experts in routed.items():
            if sid not in self._num:     # observe without begin_step: start tracking anyway
                self._num[sid] = np.zeros((self.num_layers, self.num_experts))
                self._den[sid] = np.zeros(self.num_layers)
                self._active.append(sid)
            ids = np.asarray(experts, dtype=np.int64)
            tokens = max(1, len(experts) // k)
            use = np.bincount(ids, minlength=self.num_experts) / tokens    # [E] per-token rate
            use = np.minimum(use, 1.0)
            num, den = self._num[sid], self._den[sid]
            num[layer] = num[layer] * g + use
            den[layer] = den[layer] * g + 1.0
            if tokens == 1:
                # decode pass: one token, so its routing pairs layer to layer and token to token
                self._glob_num[layer] += use
                self._glob_den[layer] += 1.0
                u = np.unique(ids)
                self._learn(sid, layer, u)
                self._predict(sid, layer, u)
                self._prev[sid] = u.tolist()
            else:
                self._prev.pop(sid, None)
                self._last.pop(sid, None)
                self._q.pop(sid, None)
        self._score(layer, routed)

    # --- the estimate ------------------------------------------------------------------------

    def _prior(self, sid: str, layer: int) -> np.ndarray:
        # Matching costs most of a call: once a request has a full decode pass its matrix moves
        # slowly, so the prior is refreshed once per pass (every layer during the first pass).
        cached = self._prior_cache.get(sid)
        if cached is not None and layer != 0:
            return cached
        k, E = self.top_k, self.num_experts
        glob = np.where(self._glob_den[:, None] > 0,
                        self._glob_num / np.maximum(self._glob_den[:, None], 1e-9), k / E)
        mat, seen = self._req.query(sid)
        p = self.collection.match(mat, seen, self.nearest)
        prior = glob if p is None else 0.5 * np.minimum(p * k, 1.0) + 0.5 * glob
        if seen is None:
            self._prior_cache[sid] = prior
        return prior

    def _learn(self, sid: str, layer: int, u: np.ndarray) -> None:
        self._use[layer][u] += 1.0
        self._tok[layer] += 1.0
        prev = self._prev.get(sid) if layer > 0 else None
        if prev is not None:
            self._cross[layer][np.ix_(prev, u)] += 1.0
            self._cross_n[layer][prev] += 1.0
        last = self._last.get(sid)
        if last is not None and last[layer] is not None:
            c = last[layer]
            self._temp[layer][np.ix_(c, u)] += 1.0
            self._temp_n[layer][c] += 1.0

    def _odds(self, layer: int, evidence: list) -> np.ndarray:
        """P(b chosen at ``layer``) for every b, naive Bayes over evidence experts: the log-rate
        log r(b) plus, per evidence expert a of weight w_a, w_a (log r(b | a) - log r(b)) (rates
        smoothed towards r(b) with ``smooth`` pseudo-tokens), the log-rate weighted c^(1/4) and the
        evidence c (c = ``evidence_scale``), normalised to sum to k (each at
        most 0.999). ``evidence``: (counts [E, E], evidence counts [E], rows, weights or None)."""
        k, E, s = self.top_k, self.num_experts, self.smooth
        r = (self._use[layer] + 1.0) / (self._tok[layer] + E / k)           # [E], sums ~ k
        log_r = np.log(r)
        c = self.evidence_scale
        score = self._base_w * log_r
        for counts, n, rows, wts in evidence:
            gain = np.log((counts[rows] + s * r) / (n[rows][:, None] + s)) - log_r   # [|A|, E]
            score = score + c * (gain.sum(axis=0) if wts is None else wts @ gain)
        w = np.exp(score - score.max())
        return np.minimum(w * (k / w.sum()), 0.999)

    def _predict(self, sid: str, layer: int, u: np.ndarray) -> None:
        """After a decode token routed ``u`` at ``layer``: the next token's layer ``layer``
        (temporal statistics), this token's layer + 1 (cross-layer and temporal) and layer + 2
        (cross-layer from the layer + 1 estimate, and temporal)."""
        L, E = self.num_layers, self.num_experts
        q = self._q.get(sid)
        if q is None:
            q = self._q[sid] = np.full((L, E), -1.0)
        last = self._last.get(sid)
        if last is None:
            last = self._last[sid] = [None] * L
        rows = u.tolist()
        last[layer] = rows
        q[layer] = self._odds(layer, [(self._temp[layer], self._temp_n[layer], rows, None)])
        src: tuple[list[int], Optional[np.ndarray]] = (rows, None)
        for nxt in (layer + 1, layer + 2):
            if nxt >= L:
                break
            ev = [(self._cross[nxt], self._cross_n[nxt], src[0], src[1])]
            if last[nxt] is not None:
                ev.append((self._temp[nxt], self._temp_n[nxt], last[nxt], None))
            q[nxt] = self._odds(nxt, ev)
            src = (list(range(E)), q[nxt])

    def _score(self, layer: int, routed: Mapping[str, Sequence[int]]) -> None:
        L, E = self.num_layers, self.num_experts
        nxt = layer + 1 if layer + 1 < L else None
        miss_p = np.ones((L, E))          # prod_s (1 - p_s)
        miss_q = np.ones((L, E))          # prod_s (1 - q_s)
        for sid in self._active:
            if sid not in self._num:
                continue
            prior = self._prior(sid, layer)
            a = self.prior_weight
            p = (self._num[sid] + a * prior) / (self._den[sid][:, None] + a)   # [L, E]
            qs = self._q.get(sid)
            q = p if qs is None else np.where(qs < 0, p, qs)
            miss_p *= 1.0 - p
            miss_q *= 1.0 - q
        p_all = np.maximum(1.0 - miss_p, P_FLOOR)
        q_all = 1.0 - miss_q
        if self._hint is not None:
            hl, scores = self._hint
            if nxt is not None and hl == nxt:
                top = np.argsort(-scores)[: self.top_k]
                q_all[nxt, top] = 1.0
            self._hint = None
        d = (self._layer_idx - layer - 1) % L + 1                               # [L] in 1..L
        t = d[:, None] + (1.0 - q_all) * L / p_all                              # [L, E]
        self._t_arr = t
        self._q_arr = q_all
        self._t = t.tolist()

    # --- decisions ---------------------------------------------------------------------------

    def victim(self, resident: Collection[ExpertKey], pinned: Collection[ExpertKey],
               layer: int) -> Optional[ExpertKey]:
        t = self._t
        best: Optional[ExpertKey] = None
        best_t = -1.0
        for key in resident:
            if key in pinned:
                continue
            v = t[key[0]][key[1]]
            if v > best_t:
                best, best_t = key, v
        return best

    def prefetch(self, layer: int, resident: Collection[ExpertKey], limit: int) -> list[ExpertKey]:
        if limit <= 0:
            return []
        t = self._t
        held = sorted((t[le][e] for le, e in resident), reverse=True)
        if not held:
            return []
        L, E = self.num_layers, self.num_experts
        rows = [(layer + 1 + x) % L for x in range(min(self.lookahead, L))]
        order = np.argsort(self._t_arr[rows], axis=None, kind="stable")
        out: list[ExpertKey] = []
        for flat in order.tolist():
            r, j = divmod(flat, E)
            i = rows[r]
            key = (i, j)
            if key in resident or self._q_arr[i, j] < self.min_q:
                continue
            n = len(out)
            if n >= len(held) or not t[i][j] < self.margin * held[n]:
                break
            out.append(key)
            if len(out) >= limit:
                break
        return out

    def end_request(self, seq_id: str) -> None:
        self._req.finish(seq_id, self.collection)
        for d in (self._num, self._den, self._prev, self._prior_cache, self._last, self._q):
            d.pop(seq_id, None)
        self._active = [s for s in self._active if s != seq_id]
