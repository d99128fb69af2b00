"""FP8 checkpoints with block scales (``quantization_config.quant_method: fp8`` and a
``weight_block_size``), the form DeepSeek-V3/R1 and the Qwen3 ``-FP8`` releases ship in: each quantized linear weight ``W`` [O, I] is float8_e4m3 with a sibling
``W_scale_inv`` [ceil(O / bo), ceil(I / bi)] holding one factor per bo x bi block (edge blocks
partial). moeserve converts such a checkpoint once (``moeserve quantize``, or ``serve`` on first
use): dense weights to bf16, as DeepSeek's own fp8_cast_bf16 does, and routed experts through
bf16 into the int8/int4 expert store. Tensors without a scale (norms, embeddings, routers) are
taken as they are.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from cache.provider import read_tensor
from cache.safetensors_file import CheckpointError, TensorRef
from engine.loader import FP8_METHOD, quant_method
SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def block_size(cfg: dict[str, Any], where: str) -> Optional[tuple[int, int]]:
    """(bo, bi) of an FP8 block-scaled checkpoint's config; None for any other checkpoint."""
    if quant_method(cfg) != FP8_METHOD:
        return None
    qc = cfg["quantization_config"]
    block = qc.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"{where}: quantization_config.weight_block_size {block!r}: moeserve "
                              f"converts FP8 checkpoints with block scales ([rows, columns])")
    return block[0], block[1]


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """weight [O, I] fp8, scale_inv [ceil(O/bo), ceil(I/bi)] -> [O, I] bf16 (products in fp32)."""
    (o, i), (bo, bi) = weight.shape, block
    want = (-(-o // bo), -(-i // bi))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"scale of shape {list(scale_inv.shape)} for a [{o}, {i}] weight in blocks of "
                         f"{bo}x{bi}; expected {list(want)}")
    scale = scale_inv.float().repeat_interleave(bo, 0)[:o].repeat_interleave(bi, 1)[:, :i]
    return (weight.float() * scale).to(torch.bfloat16)


class Fp8Reader:
    """Reads a checkpoint's tensors with FP8 weights dequantized to bf16."""

    def __init__(self, index: dict[str, TensorRef], block: tuple[int, int]) -> None:
        self.index, self.block = index, block

    def is_scale(self, name: str) -> bool:
        return name.endswith(SCALE_SUFFIX) and name[:-len(SCALE_SUFFIX)] in self.index

    def read(self, ref: TensorRef) -> torch.Tensor:
        t = read_tensor(ref)
        if t.dtype not in FP8_DTYPES:
            return t
        if "[" in ref.name:       # a slice of a stacked [E, ...] tensor: its scales are not sliced
            raise CheckpointError(f"{ref.path}: {ref.name}: FP8 experts stacked in one tensor are not "
                                  f"supported (per-expert tensors are, as DeepSeek and Qwen ship them)")
        scale = self.index.get(f"{ref.name}{SCALE_SUFFIX}")
        if scale is None:
            raise CheckpointError(f"{ref.path}: FP8 tensor {ref.name} has no {ref.name}{SCALE_SUFFIX}")
        try:
            return dequantize(t, read_tensor(scale), self.block)
        except ValueError as e:
            raise CheckpointError(f"{scale.path}: {scale.name}: {e}") from None
