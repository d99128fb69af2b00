"""The auto policy's compiled loops (cache/policies/_auto_kernels.py, _select_kernels.py): each
equals its own interpreted code (the fallback without numba), and the selections equal a
brute-force sort."""
import numpy as np
import pytest

from cache.policies import _auto_kernels as K
from cache.policies import _select_kernels as S

numba = pytest.importorskip("numba")


def _columns(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The counted columns of each row of ``counts`` [..., R, E], as learn keeps them."""
    cols = np.zeros(counts.shape, dtype=np.uint8)
    ncol = (counts > 0).sum(axis=-1).astype(np.int32)
    for idx in np.ndindex(*counts.shape[:-1]):
        nz = np.nonzero(counts[idx])[0]
        cols[idx][:len(nz)] = nz
    return cols, ncol


def _state(rng: np.random.Generator, S: int = 3, L: int = 5, E: int = 16, k: int = 2) -> dict:
    sm = 2.0
    r = np.full((L, E), k / E, dtype=np.float32)
    counts = rng.integers(0, 4, (L, 3 * E, E)) * (rng.random((L, 3 * E, E)) < 0.2)   # sparse, as learned
    cols, ncol = _columns(counts)
    return dict(
        num=rng.random((S, L, E)), den=rng.random((S, L)) * 3, glob_num=rng.random((L, E)),
        glob_den=rng.random(L) * 4, lt=np.log1p(counts / (sm * r[0])).astype(np.float32),
        rs=r, cols=cols, ncol=ncol,
        stat_n=rng.integers(0, 9, (L, 3 * E)).astype(np.float32),
        ln=np.zeros((L, 3 * E), dtype=np.float32), use=rng.random((L, E)) * 10, tok=np.full(L, 10.0),
        last=rng.integers(0, E, (S, L, k)), last_w=(rng.random((S, L, k)) < 0.8).astype(np.float64),
        dec_at=np.array([1, -1, 0]), q=np.full((S, L, E), -1.0),
        lr=np.log(rng.random((L, E)) * 0.2 + 0.01))


def _same(a: dict, b: dict) -> None:
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("layer", [0, 2, 4])
def test_learn_and_predict_compiled_equal_interpreted(layer: int) -> None:
    rng = np.random.default_rng(layer)
    base = _state(rng)
    ds = np.array([0, 2])
    ids = np.array([[3, 7], [1, 1]])
    w = np.array([[1.0, 1.0], [1.0, 0.0]])
    runs = []
    for fn_learn, compiled in [(K.learn, True), (K.learn.py_func, False)]:
        st = {name: v.copy() for name, v in base.items()}
        fn_learn(st["num"], st["den"], st["glob_num"], st["glob_den"], st["lt"], st["rs"],
                 st["cols"], st["ncol"], st["stat_n"], st["ln"], st["use"], st["tok"], st["lr"],
                 st["last"], st["last_w"], st["dec_at"], layer, ds, ids, w, 0.9, 2.0)
        K.predict(st["q"], st["lt"], st["ln"], st["lr"], st["last"],
                  st["last_w"], st["dec_at"], layer, ds, ids, w, 0.8, 0.5, compiled=compiled)
        runs.append(st)
    _same(*runs)
    # the column lists still name exactly the entries that hold a count
    st = runs[0]
    counted = st["lt"] != 0.0
    for j, a in np.ndindex(*st["ncol"].shape):
        assert sorted(st["cols"][j, a, :st["ncol"][j, a]].tolist()) == np.nonzero(counted[j, a])[0].tolist()
    assert (st["ncol"] > base["ncol"]).any()
    E, k = base["use"].shape[1], ids.shape[1]               # the learned layer's log-rates
    np.testing.assert_allclose(runs[0]["lr"][layer], np.log((runs[0]["use"][layer] + 1)
                                                            / (runs[0]["tok"][layer] + E / k)))
    q = runs[0]["q"]
    for t in range(layer, min(layer + 3, 5)):   # predicted: k in all, each capped below 1
        for row in q[ds, t]:
            assert row.max() <= 0.999 and row.min() > 0
            if row.max() < 0.999:
                assert row.sum() == pytest.approx(2.0, rel=1e-6)
            else:
                assert row.sum() < 2.0
    assert (q[1] == -1.0).all()                           # a request not in the pass is untouched


def test_a_count_lives_in_the_log_table_across_a_rebuild() -> None:
    L, E, k, sm = 2, 8, 2, 2.0
    r0 = np.float32(k / E)
    lt = np.zeros((L, 3 * E, E), dtype=np.float32)
    lt[1, 5, 3] = np.log1p(7 / (sm * r0))
    lt[1, 5, 4] = np.log1p(0.5 / (sm * r0))
    cols = np.zeros((L, 3 * E, E), dtype=np.uint8)
    ncol = np.zeros((L, 3 * E), dtype=np.int32)
    cols[1, 5, :2], ncol[1, 5] = [4, 3], 2
    rs = np.full((L, E), r0, dtype=np.float32)
    use = np.zeros((L, E))
    use[1, 3] = 40.0
    tok = np.array([0.0, 40.0])
    built = np.zeros(L)
    K.rebuild_logs(lt, rs, cols, ncol, use, tok, built, 1, k)
    assert built[1] == 40.0 and rs[1, 3] > r0
    np.testing.assert_allclose(rs[1], (use[1] + 1) / (40 + E / k), rtol=1e-6)
    counts = np.expm1(lt[1].astype(np.float64)) * sm * rs[1].astype(np.float64)[None, :]
    assert counts[5, 3] == pytest.approx(7.0, rel=1e-5)
    assert counts[5, 4] == pytest.approx(0.5, rel=1e-5)
    # entries without a count stay exactly 0 (the prior's own value), whatever the prior
    assert (np.delete(lt[1].ravel(), [5 * E + 3, 5 * E + 4]) == 0.0).all()
    assert (lt[0] == 0.0).all()                                 # other layers untouched
    before = lt.copy()
    K.rebuild_logs(lt, rs, cols, ncol, use, tok, built, 1, k)   # no growth: no-op
    np.testing.assert_array_equal(lt, before)


def test_the_prior_shift_compiled_equals_interpreted() -> None:
    rng = np.random.default_rng(3)
    E, sm = 16, 2.0
    r_old = (rng.random(E) * 0.2 + 0.01).astype(np.float32)
    r_new = (rng.random(E) * 0.2 + 0.01).astype(np.float32)
    counts = rng.integers(0, 3, (3 * E, E)) * (rng.random((3 * E, 1)) < 0.5)   # whole rows empty
    lt = np.log1p(counts / (sm * r_old)).astype(np.float32)
    cols, ncol = _columns(counts)
    runs = []
    for fn in (K._shift_prior, K._shift_prior.py_func):
        a = lt.copy()
        fn(a, cols, ncol, r_old, r_new)
        runs.append(a)
        np.testing.assert_allclose(a, np.log1p(counts / (sm * r_new)), rtol=1e-5)
        assert (a[counts == 0] == 0.0).all()
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-6)


def _brute(vals: np.ndarray, mask: np.ndarray, d: np.ndarray, pinned: set, n: int) -> list[int]:
    E = vals.shape[1]
    cand = [(-(vals[i, j] + d[i]), i * E + j) for i, j in zip(*np.nonzero(mask)) if (i, j) not in pinned]
    return [f for _, f in sorted(cand)[:n]]


@pytest.mark.parametrize("n", [1, 3, 40])
def test_top_equals_a_sort_and_leaves_the_mask_as_it_was(n: int) -> None:
    rng = np.random.default_rng(n)
    L, E = 6, 12
    vals = np.round(rng.random((L, E)) * 4) / 4            # many ties: lower index first
    mask = rng.random((L, E)) < 0.6
    d = np.arange(L, dtype=np.float64) % 3
    pinned = {(0, j) for j in range(E) if mask[0, j]} | {(3, int(np.argmax(vals[3] * mask[3])))}
    flat_pins = np.array([i * E + j for i, j in pinned], dtype=np.int64)
    rowmax, rowarg = np.zeros(L), np.zeros(L, dtype=np.int64)
    saved = mask.copy()
    for fn_refresh, fn_top in [(S.refresh, S.top), (S.refresh.py_func, S.top.py_func)]:
        K_dirty = np.ones(L, dtype=bool)
        fn_refresh(vals, mask, rowmax, rowarg, K_dirty)
        flat, got = fn_top(vals, mask, rowmax, rowarg, d, flat_pins, n)
        want = _brute(vals, mask, d, pinned, n)
        assert flat.tolist() == want
        np.testing.assert_allclose(got, [vals[f // E, f % E] + d[f // E] for f in want])
        np.testing.assert_array_equal(mask, saved)


def test_prefetch_takes_likely_guesses_only_while_they_beat_what_they_displace() -> None:
    L, E = 4, 4
    vals = np.array([[9.0, 1, 1, 1], [5, 0.5, 2, 8], [1, 1, 3, 1], [1, 1, 1, 1]])
    mask = np.array([[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=bool)
    q_all = np.array([[0, 0, 0, 0], [0.9, 0.9, 0.9, 0], [0.1, 0.1, 0.9, 0.1], [0, 0, 0, 0]])
    d = np.zeros(L)
    rowmax, rowarg, dirty = np.zeros(L), np.zeros(L, dtype=np.int64), np.ones(L, dtype=bool)
    for fn_refresh, fn_prefetch in [(S.refresh, S.prefetch), (S.refresh.py_func, S.prefetch.py_func)]:
        fn_refresh(vals, mask, rowmax, rowarg, dirty.copy())
        # candidates by t: (1,1) 0.5, (1,2) 2, (2,2) 3, (1,0) 5; held: 9, 8 -> margin 0.85 x
        out = fn_prefetch(vals, mask, rowmax, rowarg, q_all, d, np.array([1, 2]), 0.3, 0.85, 4)
        assert out.tolist() == [1 * E + 1, 1 * E + 2]      # only two resident to displace
        out = fn_prefetch(vals, mask, rowmax, rowarg, q_all, d, np.array([1, 2]), 0.3, 0.2, 4)
        assert out.tolist() == [1 * E + 1]                 # 2 is not below 0.2 x 8


@pytest.mark.parametrize("active", [[], [1], [0, 2, 1]])
def test_score_rows_combine_requests_as_one_minus_the_product(active: list) -> None:
    rng = np.random.default_rng(len(active))
    S, L, E, a, floor = 3, 4, 5, 4.0, 1e-3
    num, den, prior = rng.random((S, L, E)), rng.random((S, L)) * 3, rng.random((S, L, E))
    q = np.where(rng.random((S, L, E)) < 0.5, -1.0, rng.random((S, L, E)))
    act = np.array(active, dtype=np.int64)
    p = (num + a * prior) / (den[..., None] + a)
    qq = np.where(q < 0, p, q)
    want_p = np.maximum(1 - np.prod(1 - p[act], axis=0), floor)
    want_q = 1 - np.prod(1 - qq[act], axis=0)
    for fn in (K.score_rows, K.score_rows.py_func):
        q_all, p_all, vals = np.zeros((L, E)), np.zeros((L, E)), np.full((L, E), -7.0)
        fn(num, den, prior, q, act, 1, 3, a, floor, q_all, p_all, vals, L)
        np.testing.assert_allclose(q_all[1:3], want_q[1:3], rtol=1e-12)
        np.testing.assert_allclose(p_all[1:3], want_p[1:3], rtol=1e-12)
        np.testing.assert_allclose(vals[1:3], (1 - want_q[1:3]) * L / want_p[1:3], rtol=1e-12)
        assert (vals[[0, 3]] == -7.0).all()                 # rows outside lo..hi untouched


def _compiled() -> dict[str, int]:
    from numba.core.registry import CPUDispatcher

    from cache.policies import _tracking
    return {f"{mod.__name__}.{name}": len(fn.signatures) for mod in (K, S, _tracking)
            for name, fn in vars(mod).items() if isinstance(fn, CPUDispatcher)}


@pytest.mark.parametrize("E", [16, 300])
def test_no_loop_is_compiled_inside_a_step(E: int) -> None:
    """Constructing the policy compiles (or loads) every loop the steps will call, the prior shift
    included (it first runs only after REBUILD_MIN tokens at a layer; on a cold numba cache it
    took 3.3 s inside a request's step), for the column lists of up to 256 experts (uint8) and of
    more (uint16)."""
    from cache.policies.auto import AutoPolicy
    from cache.routing import Routed

    L, k = 6, 2
    p = AutoPolicy(L, E, k)
    before = _compiled()
    assert before[f"{K.__name__}._shift_prior"] > 0     # (_rescan runs only inside other loops)
    rng = np.random.default_rng(0)
    sids = ["a", "b", "c"]
    resident: set = set()
    rebuilt = p._built_at.copy()
    for step in range(20):
        p.begin_step(sids)
        for layer in range(L):
            if step and layer + 1 < L:
                p.hint(layer + 1, rng.random(E).astype(np.float32))
            n_tok = 8 if step == 0 else 1
            routed = Routed([(s, rng.choice(E, (n_tok, k), replace=True).ravel().tolist()) for s in sids],
                            sids if step == 0 else ())         # step 0: prompt passes
            p.observe(layer, routed)
            need = {(layer, e) for ids in routed.values() for e in ids}
            for key in need - resident:
                if len(resident) >= L * E // 4:
                    for v in p.victims(resident, need, layer, 1):
                        resident.discard(v)
                        p.on_evict(v)
                resident.add(key)
                p.on_load(key)
            for key in p.prefetch(layer, resident, 2):
                resident.add(key)
                p.on_load(key)
    assert (p._built_at > rebuilt).any(), "the run never shifted a prior: too few tokens"
    assert _compiled() == before
