"""The trace replay's simulator: real policy objects, one MoE layer per time step.

Model (documented in bench/replay.py's --help too):
- Requests run one after another in file order (batch size 1), so the policy's collection of
  past matrices fills as in a server. A request with prefill P > 0 starts with one prompt pass
  whose layer l needs every expert its P tokens chose; each decoded token is one pass.
- The cache holds C = round(capacity x L x E) experts (at least 1). Time is counted in layer
  steps: one MoE layer's compute takes 1. A link moves at most B experts per step (fluid: an
  expert takes 1/B steps; B = inf loads instantly). Demand loads and prefetches share the link;
  a demand load jumps to the front of the queue (a late prefetch the layer needs does too).
- In each layer the needed experts are taken in ascending id order (as torch.unique yields
  them); each is a hit if resident and fully loaded, else a miss that stalls the layer until it
  is loaded. Only the expert being taken and the loads in flight are pinned.
- After the layer's accesses the policy may prefetch up to ceil(2 B) - (loads queued) experts
  (E per layer when B = inf), evicting its own victims; then the layer computes (the link moves B).
- Look-ahead (moe-trace v2): before layer l routes, the policy gets ``hint(l + 1, scores)``
  with scores counting the experts the trace's look-ahead lists for layer l (layer l + 1's
  router on layer l's input), as the engine's cache does; v1 traces give no hints.
- Metrics count decode passes only: the prompt pass warms the cache but is not scored, as in
  the reference figures of the shared traces (demand hit rate on decode tokens).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from bench.replay_limits import Future
from cache.policy import CachePolicy, ExpertKey
from cache.routing import Routed


@dataclass
class Pass:
    seq_id: str
    layers: list[list[int]]     # per layer: experts chosen by this pass's tokens (repeats count)
    scored: bool                # a decode pass (metrics count it)
    last: bool                  # the request's final pass
    ahead: Optional[list[list[int]]] = None   # per layer < L-1: look-ahead experts (v2)


def build_passes(requests: Sequence[dict[str, Any]], num_layers: int) -> list[Pass]:
    passes: list[Pass] = []
    seen: dict[str, int] = {}
    for req in requests:
        n = seen.get(req["id"], 0)
        seen[req["id"]] = n + 1
        sid = req["id"] if n == 0 else f"{req['id']}#{n}"   # repeated ids stay distinct requests
        tokens, P = req["tokens"], req["prefill"]
        ahead = req.get("lookahead")
        mine: list[Pass] = []

        def hints(rows: Any) -> Optional[list[list[int]]]:
            if ahead is None:
                return None
            return [[e for t in rows for e in ahead[t][l]] for l in range(num_layers - 1)]

        if P > 0:
            mine.append(Pass(sid, [[e for tok in tokens[:P] for e in tok[l]]
                                   for l in range(num_layers)], False, False, hints(range(P))))
        mine.extend(Pass(sid, [list(tokens[t][l]) for l in range(num_layers)], True, False,
                         hints((t,))) for t in range(P, len(tokens)))
        if mine:
            mine[-1].last = True
            passes.extend(mine)
    return passes


def access_order(passes: Sequence[Pass]) -> list[ExpertKey]:
    return [(l, e) for p in passes for l, experts in enumerate(p.layers) for e in sorted(set(experts))]


@dataclass
class SimStats:
    tokens: int = 0
    accesses: int = 0
    hits: int = 0
    stall: float = 0.0
    loads: int = 0
    demand_loads: int = 0
    prefetches: int = 0
    prefetch_used: int = 0      # decode-issued prefetches accessed before eviction
    served_by_prefetch: int = 0  # decode accesses whose expert came by prefetch (on time or late)

    def metrics(self) -> dict[str, Optional[float]]:
        tok = max(self.tokens, 1)
        covered = self.served_by_prefetch + self.demand_loads
        return {
            "hit_rate": self.hits / self.accesses if self.accesses else 0.0,
            "stalls_per_token": self.stall / tok,
            "loads_per_token": self.loads / tok,
            "prefetch_precision": self.prefetch_used / self.prefetches if self.prefetches else None,
            "prefetch_recall": (self.served_by_prefetch / covered
                                if self.prefetches and covered else None),
        }


PolicyFactory = Callable[[Future], CachePolicy]


def simulate(passes: Sequence[Pass], num_layers: int, num_experts: int, capacity: float,
             link: float, make: PolicyFactory) -> SimStats:
    """Replay ``passes`` through the policy built by ``make`` (given the access Future, which
    only the limits read). Returns the decode-pass statistics."""
    future = Future(access_order(passes))
    policy = make(future)
    slots = max(1, round(capacity * num_layers * num_experts))
    resident: set[ExpertKey] = set()
    queue: "OrderedDict[ExpertKey, float]" = OrderedDict()   # in flight: remaining work (experts)
    fresh: dict[ExpertKey, bool] = {}     # prefetched, not used yet -> issued in a scored pass?
    st = SimStats()
    window = num_experts if math.isinf(link) else max(1, math.ceil(2 * link))

    def advance(dt: float) -> None:
        budget = math.inf if math.isinf(link) else link * dt
        while queue and budget > 0:
            key, rem = next(iter(queue.items()))
            if rem <= budget + 1e-12:
                budget -= rem
                del queue[key]
                policy.on_load(key)
            else:
                queue[key] = rem - budget
                budget = 0

    def make_room(pinned: set[ExpertKey], layer: int) -> bool:
        while len(resident) >= slots:
            v = policy.victim(resident, pinned, layer)
            if v is None or v not in resident or v in pinned:
                return False
            resident.discard(v)
            fresh.pop(v, None)
            policy.on_evict(v)
        return True

    for ps in passes:
        policy.begin_step([ps.seq_id])
        scored = ps.scored
        st.tokens += scored
        for layer, experts in enumerate(ps.layers):
            if ps.ahead is not None and layer + 1 < num_layers and ps.ahead[layer]:
                scores = [0.0] * num_experts
                for e in ps.ahead[layer]:
                    scores[e] += 1.0
                policy.hint(layer + 1, scores)
            policy.observe(layer, Routed([(ps.seq_id, experts)], () if scored else (ps.seq_id,)))
            needed = sorted(set(experts))
            for e in needed:
                key = (layer, e)
                if key in fresh:
                    was_scored = fresh.pop(key)
                    st.prefetch_used += was_scored
                    st.served_by_prefetch += scored
                if key in resident and key not in queue:
                    st.hits += scored
                else:
                    if key not in resident:
                        pinned = set(queue)
                        pinned.add(key)
                        if not make_room(pinned, layer):
                            raise RuntimeError(f"replay: no evictable slot for {key} "
                                               f"(cache of {slots} experts all pinned)")
                        resident.add(key)
                        queue[key] = 1.0
                        st.loads += scored
                        st.demand_loads += scored
                    queue.move_to_end(key, last=False)
                    wait = 0.0 if math.isinf(link) else queue[key] / link
                    st.stall += wait * scored
                    advance(1.0 if math.isinf(link) else wait)
                st.accesses += scored
                policy.on_access(key)
                future.pos += 1
            want = policy.prefetch(layer, resident, max(0, window - len(queue)))
            pinned = set(queue) | {(layer, e) for e in needed}
            for key in want[:max(0, window - len(queue))]:
                if key in resident:
                    continue
                if not make_room(pinned, layer):
                    break
                resident.add(key)
                queue[key] = 1.0
                pinned.add(key)
                fresh[key] = scored
                st.prefetches += scored
                st.loads += scored
            advance(1.0)
        if ps.last:
            policy.end_request(ps.seq_id)
    return st
