"""oneDNN-prepacked bf16 weights: the CPU layout for weights that stay resident.

On a CPU without AMX, oneDNN's bf16 matmul on a plain [O, In] weight reads it at 5-8 GB/s for
2-16 rows, against 12-16 GB/s once the weight is reordered into oneDNN's blocked layout ahead of
time (one thread, [1536 x 576] weights, 240 of them in turn so none stays in cache). The packed
and the plain oneDNN products are bit-identical up to 32 rows (on CPUs with AMX oneDNN switches
kernels past that; engine/kernels.py then packs a slot's weights on the fly), so resident
experts (packed) and cache slots (plain) give the same outputs. fp32 is left plain: there the plain matmul may go
to MKL, whose rounding differs, and packing gained under 10%.
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple, Optional

import torch

from cache.quant import ExpertWeights


def packs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether weights of ``dtype`` on ``device`` are kept prepacked."""
    return device.type == "cpu" and dtype == torch.bfloat16 and _onednn_bf16()


@lru_cache(maxsize=1)
def _onednn_bf16() -> bool:
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """A plain bf16 [O, In] weight -> the opaque oneDNN tensor ``packed_linear`` takes."""
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 1)


def packed_linear(x: torch.Tensor, w: torch.Tensor,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., In] @ w^T (+ bias) -> [..., O] through oneDNN, for a ``pack_weight`` result or a
    plain bf16 weight (cache slots: F.linear would send small products to ATen's own kernel,
    whose rounding differs from the packed one)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


class PackedExpert(NamedTuple):
    """One resident expert: gate and up stacked into one [2I, H] weight (one matmul instead of
    two; each output column is the same dot product either way) and down [H, I], packed."""
    gate_up: torch.Tensor
    down: torch.Tensor
    inter: int

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes


def pack_expert(w: ExpertWeights) -> PackedExpert:
    """Plain bf16 gate/up/down -> a PackedExpert (the plain tensors can be dropped after)."""
    assert isinstance(w.gate, torch.Tensor) and isinstance(w.up, torch.Tensor)
    assert isinstance(w.down, torch.Tensor)
    return PackedExpert(pack_weight(torch.cat([w.gate, w.up])), pack_weight(w.down), w.gate.shape[0])
