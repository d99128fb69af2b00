"""gpt-oss checkpoints' experts, read one at a time as gate [I, H], up [I, H], down [H, I].

gpt-oss stacks a layer's experts in one tensor per projection, in one of two forms:
- unquantized (transformers' layout): ``mlp.experts.gate_up_proj`` [E, H, 2I] with gate and up
  interleaved along the last dimension, ``mlp.experts.down_proj`` [E, I, H];
- MXFP4, as OpenAI ships them (``quantization_config.quant_method: mxfp4``):
  ``gate_up_proj_blocks`` [E, 2I, H/32, 16] uint8 (two 4-bit e2m1 codes a byte, the low nibble
  first) with ``gate_up_proj_scales`` [E, 2I, H/32] uint8 (a power of two per 32 weights,
  biased by 127), and ``down_proj_blocks`` / ``down_proj_scales`` likewise for [E, H, I].
An e2m1 code times a power of two is exact in bf16, so the dequantized weights are exactly the
MXFP4 ones. The expert biases are dense tensors (engine/models/gpt_oss.py) and are copied as such.
"""
from __future__ import annotations

from typing import Optional

import torch

from cache.provider import TensorRef, read_tensor
from cache.safetensors_file import CheckpointError, slice_leading
from engine.models.base import ExpertLayout

# the 16 e2m1 values, by code: sign bit 3, then exponent and mantissa
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127
BLOCK = 32                      # weights per scale (16 bytes of two codes each)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 -> [..., G * 32] bf16."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 blocks of shape {list(blocks.shape)} and scales of shape "
                         f"{list(scales.shape)}: expected [..., G, 16] and [..., G]")
    lut = torch.tensor(E2M1, dtype=torch.float32)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).to(torch.int64)   # [..., G, 16, 2]
    values = lut[codes].flatten(-2)                                             # [..., G, 32]
    out = torch.ldexp(values, (scales.to(torch.int32) - SCALE_BIAS)[..., None].float())
    return out.flatten(-2).to(torch.bfloat16)


class GptOssExperts:
    """The experts of a gpt-oss checkpoint (``index``: its tensors by name), in MoE-layer order."""

    def __init__(self, index: dict[str, TensorRef], layout: ExpertLayout) -> None:
        self.index, self.layout = index, layout
        p = layout.prefix(layout.moe_layers[0])
        self.mxfp4 = f"{p}.gate_up_proj_blocks" in index
        if self.mxfp4:
            blocks = self._ref(p, "gate_up_proj_blocks")
            two_i, groups = blocks.shape[1], blocks.shape[2]
            self.inter, self.hidden = two_i // 2, groups * BLOCK
        else:
            gu = self._ref(p, "gate_up_proj")
            if len(gu.shape) != 3 or gu.shape[2] % 2:
                raise CheckpointError(f"{gu.path}: {gu.name} has shape {list(gu.shape)}, expected "
                                      f"[experts, hidden, 2 * intermediate]")
            self.hidden, self.inter = gu.shape[1], gu.shape[2] // 2
        self.keys = [(mi, e) for mi in range(len(layout.moe_layers)) for e in range(layout.num_experts)]

    def _ref(self, prefix: str, name: str) -> TensorRef:
        ref = self.index.get(f"{prefix}.{name}")
        if ref is None:
            raise CheckpointError(f"checkpoint is missing tensor {prefix}.{name}")
        if ref.shape[0] != self.layout.num_experts:
            raise CheckpointError(f"{ref.path}: {ref.name} has {ref.shape[0]} experts, the config "
                                  f"says {self.layout.num_experts}")
        return ref

    def _mxfp4(self, prefix: str, name: str, e: int, shape: tuple[int, int]) -> torch.Tensor:
        blocks = read_tensor(slice_leading(self._ref(prefix, f"{name}_blocks"), e))
        scales = read_tensor(slice_leading(self._ref(prefix, f"{name}_scales"), e))
        try:
            w = dequantize_mxfp4(blocks, scales)
        except ValueError as err:
            raise CheckpointError(f"{prefix}.{name}: {err}") from None
        if tuple(w.shape) != shape:
            raise CheckpointError(f"{prefix}.{name}_blocks: expert {e} dequantizes to "
                                  f"{list(w.shape)}, expected {list(shape)}")
        return w

    def read(self, i: int, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
        """The ``i``-th expert of ``keys``: gate [I, H], up [I, H], down [H, I] (contiguous)."""
        mi, e = self.keys[i]
        p = self.layout.prefix(self.layout.moe_layers[mi])
        h, n = self.hidden, self.inter
        if self.mxfp4:
            gu = self._mxfp4(p, "gate_up_proj", e, (2 * n, h))                 # [2I, H]
            gate, up = gu[::2], gu[1::2]
            down = self._mxfp4(p, "down_proj", e, (h, n))                      # [H, I]
        else:
            gu = read_tensor(slice_leading(self._ref(p, "gate_up_proj"), e))   # [H, 2I]
            gate, up = gu[:, ::2].t(), gu[:, 1::2].t()
            d = read_tensor(slice_leading(self._ref(p, "down_proj"), e))       # [I, H]
            if tuple(d.shape) != (n, h):
                raise CheckpointError(f"{p}.down_proj: expert {e} has shape {list(d.shape)}, "
                                      f"expected {[n, h]}")
            down = d.t()
        out = {"gate": gate, "up": up, "down": down}
        return {k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in out.items()}

    def expert_names(self, i: int) -> dict[str, str]:
        """Per-expert tensor names of the ``i``-th expert, as an unstacked checkpoint has them."""
        mi, e = self.keys[i]
        p = self.layout.prefix(self.layout.moe_layers[mi])
        return {proj: f"{p}.{e}.{name}.weight" for proj, name in zip(("gate", "up", "down"), self.layout.names)}
