"""combine_experts: the per-token sum of routed expert products, bit-identical to the reference's
per-expert loop (each expert computes its tokens, ascending, in one product; each token sums its
k products in expert-id order), whatever order the provider delivers the experts in."""
from typing import Iterator, Optional

import pytest
import torch

from cache.quant import ExpertWeights
from engine.kernels import expert_forward
from engine.models.common import combine_experts


class _Provider:
    """Hands out fixed experts in a chosen order (a cache delivers ready ones first)."""

    def __init__(self, experts: list[ExpertWeights], reverse: bool) -> None:
        self.experts_, self.reverse = experts, reverse

    def read_routing(self, layer: int, ids: torch.Tensor, x: torch.Tensor) -> list[list[int]]:
        return ids.tolist()

    def experts(self, layer: int, ids: torch.Tensor, x: torch.Tensor,
                host_ids: Optional[list[list[int]]] = None) -> Iterator[tuple[int, ExpertWeights]]:
        assert host_ids is not None
        for e in sorted({e for r in host_ids for e in r}, reverse=self.reverse):
            yield e, self.experts_[e]


def _reference(experts: list[ExpertWeights], x: torch.Tensor, weights: torch.Tensor,
               ids: torch.Tensor, wdt: torch.dtype) -> torch.Tensor:
    n, k = ids.shape
    parts: dict[tuple[int, int], torch.Tensor] = {}
    for e in sorted(set(ids.flatten().tolist())):
        toks, cols = (ids == e).nonzero(as_tuple=True)          # tokens ascending
        y = (expert_forward(x[toks], experts[e]) * weights[toks, cols, None].to(wdt)).to(x.dtype)
        for i, t in enumerate(toks.tolist()):
            parts[(t, e)] = y[i]
    out = torch.zeros_like(x)
    for t in range(n):
        row = torch.zeros_like(x[0])
        for e in sorted(ids[t].tolist()):
            row += parts[(t, e)]
        out[t] = row
    return out


@pytest.mark.parametrize("n,k", [(2, 1), (3, 2), (9, 2), (40, 3)])
@pytest.mark.parametrize("wdt", [None, torch.float32])
def test_combine_equals_the_per_expert_loop_in_any_delivery_order(n: int, k: int,
                                                                  wdt: Optional[torch.dtype]) -> None:
    g = torch.Generator().manual_seed(n * 10 + k)
    H, I, E = 64, 96, 6
    experts = [ExpertWeights(*(torch.randn(s, generator=g).div(8).bfloat16()
                               for s in ((I, H), (I, H), (H, I)))) for _ in range(E)]
    x = torch.randn(n, H, generator=g).bfloat16()
    w, ids = torch.topk(torch.softmax(torch.randn(n, E, generator=g), -1), k, dim=-1)
    want = _reference(experts, x, w, ids, wdt or x.dtype)
    for reverse in (False, True):
        got = combine_experts(_Provider(experts, reverse), 0, x, w, ids, wdt)   # type: ignore[arg-type]
        assert torch.equal(got, want)
