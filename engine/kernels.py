"""Expert matmuls for every storage format (cache/quant.py), behind one function.

CPU: int8 through ``torch._weight_int8pack_mm`` and int4 through
``torch._weight_int4pack_mm_for_cpu`` (both take bf16 activations; measured here at the default
model's [1536x576] shapes, 1 thread, batch 1: bf16 F.linear ~183 us, fp32 ~72 us, int8 ~54 us,
int4 ~48 us). CUDA: int4 through the tinygemm kernel ``torch._weight_int4pack_mm``; int8 as
a dequantize-then-matmul (weight-only int8: half the bytes of bf16 on the link and in VRAM).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from cache.quant import SCALE_DTYPE, ExpertWeights, Weight, dequantize_int4, unpack_int4_cpu


def linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x [N, In] @ w[O, In]^T -> [N, O] in x's dtype, whatever w's format."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w)
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


def expert_forward(x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    """x [N, H] through one SwiGLU expert -> [N, H]."""
    return linear(F.silu(linear(x, w.gate)) * linear(x, w.up), w.down)


@contextmanager
def step_matmuls(device: torch.device, dtype: torch.dtype, rows: int) -> Iterator[None]:
    """Pick the CPU bf16 matmul backend for one forward of ``rows`` token rows.

    A single row (one sequence decoding) skips oneDNN for ATen's bf16 matrix-vector kernel: on the
    default 8x model that decoded 82 -> 47 ms/token in bf16 and 54.5 -> 37 in int4 (LM head and
    projections; 3 alternating runs, 1 thread). With 2+ rows ATen's bf16 GEMM was 2-10x slower
    than oneDNN's, so prompt passes and batched decode keep oneDNN. The switch is process-wide,
    which is safe because one engine thread runs every forward."""
    if device.type != "cpu" or dtype != torch.bfloat16 or rows != 1:
        yield
        return
    prev = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(prev)


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
