"""cache/offload.py and the routing it hands on: the policy gets the tracer's split (prompt flags
included), and a layer reads its routing and the next router's look-ahead to the host once."""
from __future__ import annotations

from typing import Collection, Mapping, Optional, Sequence

import torch

from cache import policies
from cache.offload import OffloadedExpertProvider
from cache.policy import CachePolicy, ExpertKey
from cache.provider import Router, StepRows, lookahead
from configs.cache import CacheConfig
from tests.cache.offload_setup import E, EXPERT_BYTES, H, K, L, flat, make, routing


class _RoutingSpy(CachePolicy):
    """Any unpinned victim; remembers every routing object it was handed."""

    name = "spy"

    def __init__(self) -> None:
        super().__init__(L, E, K)
        self.seen: list = []

    def observe(self, layer: int, routed: Mapping[str, Sequence[int]]) -> None:
        self.seen.append(routed)

    def victim(self, resident: Collection[ExpertKey], pinned: Collection[ExpertKey],
               layer: int) -> Optional[ExpertKey]:
        return next((k for k in resident if k not in pinned), None)


def test_policy_gets_the_tracers_split_with_prompt_flags(ckpt):
    from cache.routing import Routed
    from cache.trace import ActivationTracer
    sources, _ = ckpt
    spy = _RoutingSpy()
    tracer = ActivationTracer(L, E, K)
    p = make(sources, spy, budget=str(4 * EXPERT_BYTES))
    p.tracer = tracer
    returned = []
    real = tracer.record
    tracer.record = lambda layer, ids: returned.append(real(layer, ids)) or returned[-1]
    # a one-token prompt routes exactly top_k ids, as a decode does: only the flag tells
    p.begin_step(StepRows(("a", "b"), (1, 1), (True, False)))
    for _ in p.experts(0, torch.tensor([[0, 1], [2, 3]])):
        pass
    assert spy.seen[0] is returned[0]                    # split once, the same object
    assert isinstance(spy.seen[0], Routed) and spy.seen[0].prompt == {"a"}
    assert dict(spy.seen[0]) == {"a": [0, 1], "b": [2, 3]}
    p.tracer = None                                      # without a tracer: the same split
    for _ in p.experts(1, torch.tensor([[4, 5], [6, 7]])):
        pass
    assert spy.seen[1].prompt == {"a"} and dict(spy.seen[1]) == {"a": [4, 5], "b": [6, 7]}
    p.close()


def test_policies_take_prompt_passes_from_the_split():
    from cache.policies._tracking import RequestTracker
    from cache.routing import Routed
    t = RequestTracker(2, 4, 2)
    t.begin_step(["a"])
    t.observe(0, Routed([("a", [0, 1])], prompt=["a"]))     # one prompt token: k ids
    t.observe(1, Routed([("a", [2, 3])], prompt=["a"]))
    assert t.prompt[t.live["a"]].sum() == 4 and not t.decode[t.live["a"]].any()
    t.begin_step(["a"])
    t.observe(0, {"a": [1, 2]})                              # plain mapping: guessed (decode)
    assert t.decode[t.live["a"]].sum() == 2


def test_one_host_read_per_layer_with_lookahead(ckpt, monkeypatch) -> None:
    """read_routing reads the routing and the next router's look-ahead in one host read; the
    layer's experts() then reads nothing more, and the policy gets the same hint as when the
    look-ahead is read on its own."""
    sources, want = ckpt
    g = torch.Generator().manual_seed(3)
    routers = [Router(torch.randn(E, H, generator=g)) for _ in range(L)]
    hints: list[tuple[int, list[float]]] = []
    pol = policies.make_policy("auto", L, E, K, None)
    real_hint = pol.hint
    pol.hint = lambda layer, scores, ranked=None: hints.append((layer, list(scores))) or real_hint(layer, scores, ranked)
    p = OffloadedExpertProvider(sources, torch.device("cpu"), torch.float32,
                                CacheConfig(expert_budget=str(4 * EXPERT_BYTES)), pol, routers=routers)
    reads: list[torch.Size] = []
    counting = [False]
    # every way a computed tensor reaches the host (uint8 ones are the cache's own byte
    # buffers, which the disk tier reads into through numpy views)
    for read in ("tolist", "numpy", "item"):
        real = getattr(torch.Tensor, read)
        monkeypatch.setattr(torch.Tensor, read, lambda t, *a, _real=real, **kw: (
            reads.append(t.shape) if counting[0] and t.dtype != torch.uint8 else None)
            or _real(t, *a, **kw))
    p.begin_step(StepRows(("a",), (1,), (False,)))
    for layer in range(L):
        hidden = torch.randn(1, H, generator=g)
        ids = routing(g, 1)
        reads.clear()
        counting[0] = True
        rows = p.read_routing(layer, ids, hidden)
        for e, w in p.experts(layer, ids, hidden, host_ids=rows):
            assert torch.equal(flat(w), want[(layer, e)].float())
        counting[0] = False
        assert rows == ids.tolist()
        assert len(reads) == 1, reads
        if layer + 1 < L:
            assert hints[-1] == (layer + 1, list(lookahead(routers[layer + 1], hidden, K, False)[0]))
    p.close()


def test_lookahead_applies_the_router_bias() -> None:
    """gpt-oss's routers add a bias to their logits: the look-ahead ranks experts with it."""
    w, b = torch.zeros(4, 8), torch.tensor([0.0, 3.0, 0.0, 1.0])
    scores, ahead = lookahead(Router(w, b), torch.randn(2, 8), 2, True)
    assert ahead == [[1, 3], [1, 3]] and int(scores.argmax()) == 1
    scores, ahead = lookahead(Router(w), torch.randn(2, 8), 2, True)
    assert float(scores.max() - scores.min()) == 0.0          # without it: no preference
