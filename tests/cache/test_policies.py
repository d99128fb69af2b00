import numpy as np
import pytest

from cache.eam import EAMCollection
from cache.policies import POLICY_NAMES, AutoPolicy, LFUPolicy, LRUPolicy, MoEInfinityPolicy, make_policy
from cache.policy import ranked_hint_ids


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
    assert p.victim(resident, set(), 0) in ((0, 3), (1, 2))       # never used
    # of the two the request reuses, (0, 0) is needed only by the next token
    assert p.victim(resident, {(0, 3), (1, 2)}, 0) == (0, 0)
    assert p.prefetch(0, {(0, 0), (0, 3)}, 1) == [(1, 1)]
    assert p.prefetch(0, {(0, 0), (1, 1)}, 4) == []      # nothing missing beats a resident one


def test_auto_learns_cross_layer_transitions():
    p = AutoPolicy(2, 4, 1)
    # layer 1 follows layer 0: 0 -> 1 and 2 -> 3, alternating, so frequency alone is 50/50
    run_passes(p, [[[0], [1]], [[2], [3]]] * 20)
    p.begin_step(["r"])
    p.observe(0, {"r": [2]})
    assert p.prefetch(0, {(0, 2), (0, 0)}, 1) == [(1, 3)]
    p.begin_step(["r"])
    p.observe(0, {"r": [0]})
    assert p.prefetch(0, {(0, 2), (0, 0)}, 1) == [(1, 1)]


def test_auto_learns_token_to_token_transitions():
    p = AutoPolicy(2, 4, 1)
    run_passes(p, [[[0], [1]], [[2], [3]]] * 20)      # tokens alternate 0 and 2 at layer 0
    p.begin_step(["r"])
    p.observe(0, {"r": [2]})
    # the next token's layer 0 will route to 0, not to 2 again (same distance, same frequency)
    assert p.victim({(0, 0), (0, 2)}, set(), 0) == (0, 2)
    p.begin_step(["r"])
    p.observe(0, {"r": [0]})
    assert p.victim({(0, 0), (0, 2)}, set(), 0) == (0, 0)


def test_auto_chains_transitions_two_layers_ahead():
    p = AutoPolicy(3, 4, 1)
    # two patterns in a fixed but irregular order: the previous token says nothing, the
    # current token's layer 0 decides layers 1 and 2
    a, b = [[0], [1], [2]], [[3], [0], [3]]
    run_passes(p, [a if bit == "1" else b for bit in "1101001110010110100011101101001010110110"])
    p.begin_step(["r"])
    p.observe(0, {"r": [0]})
    assert p.victim({(2, 2), (2, 3)}, set(), 0) == (2, 3)
    p.begin_step(["r"])
    p.observe(0, {"r": [3]})
    assert p.victim({(2, 2), (2, 3)}, set(), 0) == (2, 2)


def test_auto_damps_naive_bayes_evidence_for_large_top_k():
    assert AutoPolicy(2, 8, 1).evidence_scale == 1.0
    assert AutoPolicy(2, 8, 2).evidence_scale == 1.0
    assert AutoPolicy(2, 64, 8).evidence_scale == 0.25
    # top-4 of 16: layer 1 follows layer 0 (experts 0-3 -> 4-7, 8-11 -> 12-15), alternating
    a, b = [[0, 1, 2, 3], [4, 5, 6, 7]], [[8, 9, 10, 11], [12, 13, 14, 15]]
    qs = []
    for scale in (None, 1.0):
        p = AutoPolicy(2, 16, 4, evidence_scale=scale)
        run_passes(p, [a, b] * 10)
        p.begin_step(["r"])
        p.observe(0, {"r": [0, 1, 2, 3]})
        qs.append(p.predicted("r")[1])
    damped, plain = qs
    # same ranking, less certainty: 4 correlated evidence experts are not 4 independent ones
    assert set(np.argsort(-damped)[:4]) == set(np.argsort(-plain)[:4]) == {4, 5, 6, 7}
    others = [j for j in range(16) if not 4 <= j < 8]
    assert damped[others].max() > plain[others].max()
    assert damped[4:8].min() > damped[others].max()


def test_auto_prefetches_only_within_lookahead():
    pattern = [[[0], [1], [2], [3]]] * 10
    near, far = AutoPolicy(4, 4, 1, lookahead=1), AutoPolicy(4, 4, 1, lookahead=3)
    for p in (near, far):
        run_passes(p, pattern)
        p.begin_step(["r"])
        p.observe(0, {"r": [0]})
    # every needed expert is missing; the resident ones are never used
    resident = {(0, 0), (0, 1), (1, 0), (2, 0), (3, 0), (1, 2), (2, 1), (3, 2)}
    got_near, got_far = near.prefetch(0, resident, 4), far.prefetch(0, resident, 4)
    assert got_near[0] == (1, 1) and all(layer == 1 for layer, _ in got_near)
    assert got_far[:3] == [(1, 1), (2, 2), (3, 3)]


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


def test_auto_hint_ranked_by_the_caller_equals_ranked_by_the_policy():
    scores = [0.1, 0.4, 0.2, 0.3]
    own, given = AutoPolicy(3, 4, 2), AutoPolicy(3, 4, 2)
    for p, ranked in ((own, None), (given, ranked_hint_ids(scores, 2))):
        run_passes(p, [[[0, 1], [1, 2], [2, 3]], [[0, 2], [1, 3], [0, 3]]] * 2)
        p.begin_step(["r"])
        p.hint(1, scores, ranked)
        p.observe(0, {"r": [0, 1]})
    np.testing.assert_array_equal(own.predicted("r"), given.predicted("r"))
    assert own.prefetch(0, {(0, 0), (0, 1)}, 3) == given.prefetch(0, {(0, 0), (0, 1)}, 3)


def test_auto_end_request_feeds_collection_and_forgets_request():
    coll = EAMCollection(2, 4)
    p = AutoPolicy(2, 4, 1, coll)
    run_passes(p, [[[0], [1]], [[0], [2]]])
    p.end_request("r")
    assert len(coll) == 1 and coll.matrices()[0].tolist() == [[1, 0, 0, 0], [0, .5, .5, 0]]
    assert not p.tracked("r")


def test_masked_rows_follow_load_evict_pins_and_offsets():
    from cache.policies._rows import MaskedRows
    r = MaskedRows(3, 4)
    r.vals[:] = [[5, 1, 0, 0], [2, 9, 0, 0], [3, 3, 7, 0]]
    for key in [(0, 0), (0, 1), (1, 0), (2, 2)]:
        r.load(key)
    assert r.best(set()) == (2, 2)                       # (1, 1) scores 9 but is not resident
    assert r.best({(2, 2)}) == (0, 0) and r.best({(0, 0), (2, 2)}) == (1, 0)
    assert r.best(set(), np.array([0.0, 0.0, -10.0])) == (0, 0)
    r.evict((0, 0))
    r.vals[2, 2] = 1.0
    r.touch(2)
    assert r.best(set()) == (1, 0)
    assert r.best_n(set(), 3)[0] == (1, 0) and set(r.best_n(set(), 3)[1:]) == {(0, 1), (2, 2)}
    assert r.top(2).tolist() == [2.0, 1.0]
    assert r.best({(0, 1), (1, 0), (2, 2)}) is None and r.best_n({(0, 1), (1, 0), (2, 2)}, 2) == []


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_victims_at_once_equal_victims_one_by_one(name):
    rng = np.random.default_rng(1)
    p = make_policy(name, 4, 8, 2, EAMCollection(4, 8))
    resident = set()
    for step in range(12):                 # play a few passes with loads, accesses, evictions
        p.begin_step(["r"])
        for layer in range(4):
            ids = rng.choice(8, 2, replace=False).tolist()
            p.observe(layer, {"r": ids})
            for e in ids:
                if (layer, e) not in resident:
                    if len(resident) >= 10:
                        v = p.victim(resident, {(layer, x) for x in ids}, layer)
                        resident.discard(v)
                        p.on_evict(v)
                    resident.add((layer, e))
                    p.on_load((layer, e))
                p.on_access((layer, e))
    pinned = {(3, e) for e in range(8)}
    batch = p.victims(resident, pinned, 3, 4)
    one_by_one, held = [], set(pinned)
    for _ in range(4):
        one_by_one.append(p.victim(resident, held, 3))
        held.add(one_by_one[-1])
    assert len(batch) == 4 and not set(batch) & pinned and set(batch) <= resident
    assert batch == one_by_one


def test_auto_learns_the_precision_of_each_lookahead_rank() -> None:
    p = AutoPolicy(2, 4, 2)
    for _ in range(20):
        p.begin_step(["r"])
        p.hint(1, [0.1, 0.4, 0.2, 0.3])           # ranks: expert 1, then expert 3
        p.observe(0, {"r": [0, 2]})
        p.observe(1, {"r": [1, 2]})               # the first-ranked is used, the second never
    prec = p.hint_precision(1)
    assert prec[0] > 0.9 and prec[1] < 0.3
    assert list(p.hint_precision(4)) == pytest.approx([0.8, 0.8])   # batches: nothing seen yet
