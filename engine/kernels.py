"""Matmuls for every weight format (cache/quant.py, cache/packed.py), behind one function each.

CPU: int8 through ``torch._weight_int8pack_mm`` and int4 through
``torch._weight_int4pack_mm_for_cpu`` (both take bf16 activations); bf16 weights that stay
resident (dense layers, resident experts) are oneDNN-prepacked, cache slots stay plain (same
bits, see cache/packed.py). CUDA: int4 through the tinygemm kernel ``torch._weight_int4pack_mm``;
int8 as a dequantize-then-matmul (weight-only int8: half the bytes of bf16 on the link and in VRAM).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cache.packed import PackedExpert, pack_expert, pack_weight, packed_linear, packs
from cache.provider import HostExpert, ProvidedExpert
from cache.quant import QTensor, Weight, default_group_size, pack_int4, unpack_int4_cpu
from cache.quantizers import SCALE_DTYPE, dequantize_int4, quantize_int4


def linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x [N, In] @ w[O, In]^T -> [N, O] in x's dtype, whatever w's format."""
    if isinstance(w, torch.Tensor):
        return packed_linear(x, w) if packs(w.device, w.dtype) else F.linear(x, w)
    xq = x.to(SCALE_DTYPE)
    if w.kind == "int8":
        if x.device.type == "cuda":
            out = F.linear(xq, w.q.to(SCALE_DTYPE)) * w.scales
        else:
            out = torch._weight_int8pack_mm(xq, w.q, w.scales)
    elif w.layout == "cpu":
        if x.device.type != "cpu":
            raise RuntimeError("int4 experts in the cpu pack layout cannot run on "
                               f"{x.device}; convert the store for this device")
        out = torch._weight_int4pack_mm_for_cpu(xq, w.q, w.group_size, w.scales)
    else:
        out = torch._weight_int4pack_mm(xq, w.q, w.group_size, w.scales)
    return out.to(x.dtype)


# On CPUs with AMX, oneDNN takes another kernel for a plain weight than for a packed one past
# 32 rows, and the bits differ: a cache slot (plain) given more rows than this is packed on the
# fly, so that offloaded output stays identical to resident (packed) at every row count. The
# reorder costs about as much as reading the expert once, paid only by prompt chunks.
PLAIN_MAX_ROWS = 32


@dataclass(frozen=True)
class ExpertMath:
    """Experts that are not plain SwiGLU: gpt-oss's add a bias to each projection and use a
    clamped SwiGLU, (clamp(up, -l, l) + 1) * g * sigmoid(alpha * g) with g = min(gate, l).
    The biases are the MoE layer's own (dense, resident) tensors: the slots hold the weights
    only, in the same format as every other family's."""

    alpha: float
    limit: float
    gate_up_bias: torch.Tensor      # [E, 2I], gate and up interleaved as gpt-oss stores them
    down_bias: torch.Tensor         # [E, H]

    def hidden(self, e: int, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """gate/up [N, I] without bias -> the activation [N, I]."""
        b = self.gate_up_bias[e].to(gate.device)
        g = (gate + b[::2]).clamp(max=self.limit)
        u = (up + b[1::2]).clamp(min=-self.limit, max=self.limit)
        return (u + 1) * (g * torch.sigmoid(g * self.alpha))

    def out(self, e: int, y: torch.Tensor) -> torch.Tensor:
        return y + self.down_bias[e].to(y.device)


def expert_forward(x: torch.Tensor, w: ProvidedExpert, math: Optional[ExpertMath] = None,
                   e: int = -1) -> torch.Tensor:
    """x [N, H] through expert ``e`` -> [N, H] (on x's device, wherever w lies): SwiGLU, or
    ``math``'s biases and activation."""
    if isinstance(w, HostExpert):                   # computed on the CPU where it lies
        xh = x.to("cpu")
        t0 = time.perf_counter()
        out = expert_forward(xh, w.weights, math, e)
        w.report(xh.shape[0], time.perf_counter() - t0)
        return out.to(x.device)
    if not isinstance(w, PackedExpert) and x.shape[0] > PLAIN_MAX_ROWS \
            and isinstance(w.gate, torch.Tensor) and packs(w.gate.device, w.gate.dtype):
        w = pack_expert(w)
    if isinstance(w, PackedExpert):
        gate, up = packed_linear(x, w.gate_up).split(w.inter, dim=-1)     # [N, I] each
        if math is None:
            return packed_linear(F.silu(gate) * up, w.down)
        return math.out(e, packed_linear(math.hidden(e, gate, up), w.down))
    if math is None:
        return linear(F.silu(linear(x, w.gate)) * linear(x, w.up), w.down)
    return math.out(e, linear(math.hidden(e, linear(x, w.gate), linear(x, w.up)), w.down))


class PackedLinear(nn.Module):
    """An nn.Linear whose weight is kept oneDNN-prepacked (see cache/packed.py); ``keep_plain``
    also keeps the plain weight as ``weight`` (for tensors read elsewhere, e.g. routers)."""

    def __init__(self, lin: nn.Linear, keep_plain: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.packed = pack_weight(lin.weight.detach())
        self.weight = lin.weight if keep_plain else self.packed
        self.bias = None if lin.bias is None else lin.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.bias)


def _replace_linears(model: nn.Module, take: Callable[[nn.Linear], bool],
                     make: Callable[[nn.Linear], nn.Module]) -> int:
    """Replace each nn.Linear of ``model`` that ``take`` accepts by ``make(it)``; how many."""
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and take(mod)]
    for name, mod in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, make(mod))
    return len(targets)


def pack_linears(model: nn.Module, keep_plain: Iterable[torch.Tensor] = ()) -> int:
    """Replace every nn.Linear of ``model`` by a PackedLinear; those whose weight is in
    ``keep_plain`` keep their plain weight too. Returns how many were replaced."""
    kept = {id(t) for t in keep_plain}
    return _replace_linears(model, lambda mod: True,
                            lambda mod: PackedLinear(mod, keep_plain=id(mod.weight) in kept))


class QuantLinear(nn.Module):
    """An nn.Linear whose weight is int4 in groups of ``group_size`` inputs (default: the largest
    of 128/64/32 dividing its input), quantized once at load in the pack layout of its device."""

    def __init__(self, lin: nn.Linear, group_size: Optional[int] = None) -> None:
        super().__init__()
        w = lin.weight.detach()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        g = group_size or default_group_size(self.in_features)
        layout = "cuda" if w.device.type == "cuda" else "cpu"
        q, sz = quantize_int4(w, g)                                     # on w's device
        self.weight = QTensor("int4", pack_int4(q, layout).to(w.device), sz, g, layout,
                              (self.out_features, self.in_features))
        self.bias = None if lin.bias is None else lin.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x.reshape(-1, self.in_features), self.weight)      # [N, O]
        out = out.view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


def quantize_linears(model: nn.Module, keep: Iterable[torch.Tensor] = (),
                     group_size: Optional[int] = None) -> int:
    """Replace every nn.Linear of ``model`` by a QuantLinear but those whose weight is in
    ``keep``, whose input does not divide into the groups or whose output is not a multiple of 16
    (the int4 packs' tile; e.g. Qwen's one-output shared-expert gate). Returns how many."""
    kept = {id(t) for t in keep}
    return _replace_linears(
        model, lambda mod: (id(mod.weight) not in kept and mod.in_features % (group_size or 32) == 0
                            and mod.out_features % 16 == 0),
        lambda mod: QuantLinear(mod, group_size))


def dequantize(w: Weight) -> torch.Tensor:
    """The fp32 [O, In] weight ``w`` stands for (reference for tests and checks)."""
    if isinstance(w, torch.Tensor):
        return w.float()
    o, i = w.shape
    if w.kind == "int8":
        return w.q.float() * w.scales.float()[:, None]
    if w.layout == "cpu":
        return dequantize_int4(unpack_int4_cpu(w.q.cpu(), o, i), w.scales.cpu(), w.group_size)
    # other layouts: multiply the identity through the kernel (its output is rounded to bf16)
    eye = torch.eye(i, dtype=SCALE_DTYPE, device=w.q.device)
    return linear(eye, w).float().t().contiguous()
