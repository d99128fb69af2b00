import numpy as np
import pytest

from cache.eam import EAMCollection
from cache.policies import POLICY_NAMES, AutoPolicy, LFUPolicy, LRUPolicy, MoEInfinityPolicy, make_policy


def test_registry_builds_every_policy_and_rejects_unknown():
    for name in POLICY_NAMES:
        p = make_policy(name, 4, 8, 2, EAMCollection(4, 8))
        assert p.name == name and p.num_layers == 4
    with pytest.raises(ValueError, match="unknown cache policy 'fifo'"):
        make_policy("fifo", 4, 8, 2)


def test_lru_evicts_least_recent_unpinned():
    p = LRUPolicy(2, 4, 1)
    for key in [(0, 0), (0, 1), (1, 0)]:
        p.on_load(key)
    p.on_access((0, 0))
    resident = {(0, 0), (0, 1), (1, 0)}
    assert p.victim(resident, set(), 0) == (0, 1)
    assert p.victim(resident, {(0, 1)}, 0) == (1, 0)
    p.on_evict((1, 0))
    assert p.victim({(0, 0), (0, 1)}, {(0, 1)}, 0) == (0, 0)
    assert p.victim({(0, 0)}, {(0, 0)}, 0) is None


def test_lfu_evicts_fewest_uses_ties_to_least_recent():
    p = LFUPolicy(2, 4, 1)
    for key in [(0, 0), (0, 0), (0, 1), (1, 1), (0, 0)]:
        p.on_access(key)
    resident = {(0, 0), (0, 1), (1, 1)}
    assert p.victim(resident, set(), 0) == (0, 1)        # 1 use, older than (1, 1)
    p.on_access((0, 1))
    assert p.victim(resident, set(), 0) == (1, 1)
    assert p.victim(resident, {(1, 1), (0, 1)}, 0) == (0, 0)


def moe_inf_with_history():
    coll = EAMCollection(4, 2)
    coll.insert(np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=float))
    p = MoEInfinityPolicy(4, 2, 1, coll, nearest=1)
    p.begin_step(["r"])
    p.observe(0, {"r": [0]})
    return p, coll


def test_moe_infinity_prefetch_priority_by_prediction_and_distance():
    p, _ = moe_inf_with_history()
    # 1 x (1 - 1/4), 1 x (1 - 2/4), 1 x (1 - 3/4); zero-probability experts never prefetched
    assert p.prefetch(0, set(), 5) == [(1, 0), (2, 1), (3, 1)]
    assert p.prefetch(0, {(1, 0)}, 1) == [(2, 1)]


def test_moe_infinity_evicts_low_prediction_and_late_layers():
    p, _ = moe_inf_with_history()
    resident = {(1, 0), (1, 1), (3, 1)}
    assert p.victim(resident, set(), 0) == (1, 1)        # (eps) x 3/4
    assert p.victim(resident, {(1, 1)}, 0) == (3, 1)     # 1 x 1/4 < 1 x 3/4


def test_moe_infinity_end_request_feeds_collection():
    p, coll = moe_inf_with_history()
    for layer, e in [(1, 1), (2, 0), (3, 0)]:
        p.observe(layer, {"r": [e]})
    p.end_request("r")
    assert len(coll) == 2
    assert coll.matrices()[1].tolist() == [[1, 0], [0, 1], [1, 0], [1, 0]]


def run_passes(p, passes, sid="r"):
    for routing in passes:
        p.begin_step([sid])
        for layer, experts in enumerate(routing):
            p.observe(layer, {sid: experts})


def test_auto_evicts_what_the_request_does_not_reuse():
    p = AutoPolicy(2, 4, 1)
    run_passes(p, [[[0], [1]]] * 6)
    p.begin_step(["r"])
    p.observe(0, {"r": [0]})
    resident = {(0, 0), (0, 3), (1, 1), (1, 2)}
    # unused experts: (0, 3) is needed no sooner than (1, 2) and is further away
    assert p.victim(resident, set(), 0) == (0, 3)
    assert p.victim(resident, {(0, 3)}, 0) == (1, 2)
    assert p.prefetch(0, {(0, 0), (0, 3)}, 1) == [(1, 1)]
    assert p.prefetch(0, {(0, 0), (1, 1)}, 4) == []      # nothing missing beats a resident one


def test_auto_learns_cross_layer_transitions():
    p = AutoPolicy(2, 4, 1, trans_strength=0.25)
    # layer 1 follows layer 0: 0 -> 1 and 2 -> 3, alternating, so frequency alone is 50/50
    run_passes(p, [[[0], [1]], [[2], [3]]] * 20)
    p.begin_step(["r"])
    p.observe(0, {"r": [2]})
    assert p.prefetch(0, {(0, 2), (0, 0)}, 1) == [(1, 3)]
    p.begin_step(["r"])
    p.observe(0, {"r": [0]})
    assert p.prefetch(0, {(0, 2), (0, 0)}, 1) == [(1, 1)]


def test_auto_uses_gate_hint_for_next_layer():
    p = AutoPolicy(2, 4, 1)
    run_passes(p, [[[0], [1]], [[0], [3]]] * 3)      # layer 1 is a coin toss between 1 and 3
    p.begin_step(["r"])
    p.observe(0, {"r": [0]})
    assert p.prefetch(0, {(0, 0), (0, 1)}, 1) in ([(1, 1)], [(1, 3)])
    p.begin_step(["r"])
    p.hint(1, [0.1, 0.2, 3.0, 0.0])                   # the next router prefers expert 2
    p.observe(0, {"r": [0]})
    assert p.prefetch(0, {(0, 0), (0, 1)}, 1) == [(1, 2)]


def test_auto_end_request_feeds_collection_and_forgets_request():
    coll = EAMCollection(2, 4)
    p = AutoPolicy(2, 4, 1, coll)
    run_passes(p, [[[0], [1]], [[0], [2]]])
    p.end_request("r")
    assert len(coll) == 1 and coll.matrices()[0].tolist() == [[1, 0, 0, 0], [0, .5, .5, 0]]
    assert "r" not in p._num and "r" not in p._req.live
