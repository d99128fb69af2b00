"""The compiled int4 search (cache/_int4_kernel.py) against torch's (cache/quantizers._search):
the same grids, codes, scales and zeros on every kind of weights a conversion meets (but where a
refit falls on a tie between two bf16 scales), and quantize_int4 choosing it for large CPU
matrices only."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

import cache.quantizers as Q
from cache import _int4_kernel as K
from tests.engine.test_kernels import _on_a_4_bit_grid, _weights


def _kind(kind: str, o: int, i: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    if kind == "float32":
        return _weights(o, i)
    if kind == "bf16":
        return _weights(o, i, seed=1).to(torch.bfloat16)
    if kind == "heavy tails":
        return (torch.randn(o, i, generator=gen) ** 3 * 0.01).to(torch.bfloat16)
    if kind == "degenerate":          # constant groups, two-valued groups, one outlier in zeros
        w = torch.zeros(o, i)
        w[: o // 4] = 0.25
        w[o // 4: o // 2] = torch.randint(0, 2, (o // 4, i), generator=gen).float() * 0.5 - 0.1
        w[o // 2:, ::37] = 3.0
        return w
    return _on_a_4_bit_grid(kind, o, i)


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("kind", ["float32", "bf16", "heavy tails", "degenerate", "Q4_0", "Q4_K"])
def test_compiled_int4_search_equals_torchs(kind: str, group: int) -> None:
    w = _kind(kind, 256, 1024)
    g = w.float().view(256, -1, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step, base = Q._grid(g, lo, hi)
    on_grid = Q._on_grid(g, step, base)
    assert on_grid == (kind.startswith("Q4") and group == 32)    # a GGUF block holds 32 weights
    grid = [np.empty((256, 1024 // group), np.float32) for _ in range(4)]
    assert K.grid_rows(np.sort(g.numpy(), axis=-1), *grid) == on_grid
    for a, b in zip(grid, (lo, hi, step, base)):
        assert np.array_equal(a, b.squeeze(-1).numpy())
    want = Q._search(g, lo, hi, step, base, on_grid)
    got = Q._quantize_compiled(g)
    for a, b in zip(got, want):
        assert a.shape == b.shape
    # the refit's sums are float64 in the kernel, float32 in torch: a float32 rounding apart,
    # which decides only where a refit falls on a tie between two bf16 scales (Q4_K: 4 of 8,192
    # groups; none in the others)
    assert float((got[0].float() == want[0]).float().mean()) >= 1 - 1e-4
    assert float(((got[1] != want[1]) | (got[2] != want[2])).float().mean()) <= 1e-3

    def err(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> float:
        return float(((q.float() - 8) * s + z - g).pow(2).sum())
    assert err(*got) <= err(*want) * 1.001 + 1e-12


def test_quantize_int4_compiles_large_cpu_matrices_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """From COMPILED_MIN_WEIGHTS weights the compiled search runs (torch's is not called); below
    it, or without numba, torch's; the results agree."""
    big = _weights(1024, Q.COMPILED_MIN_WEIGHTS // 1024, seed=2)
    small = big[:512]

    def refuse(*args: object) -> None:
        raise AssertionError("the other search ran")
    with monkeypatch.context() as m:
        m.setattr(Q, "_quantize_compiled", refuse)
        assert Q.quantize_int4(small, 64)[0].shape == small.shape     # torch's search, or it raised
        m.setattr(Q, "_kernel", lambda: None)                      # as without numba
        want_big = Q.quantize_int4(big, 64)
    monkeypatch.setattr(Q, "_search", refuse)
    got_big = Q.quantize_int4(big, 64)
    assert float((got_big[0] == want_big[0]).float().mean()) >= 1 - 1e-5
    assert float((got_big[1] == want_big[1]).float().mean()) >= 1 - 1e-3
