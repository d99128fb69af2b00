"""Per-sequence state of linear-attention layers (Qwen3-Next's Gated DeltaNet), beside the KV cache.

Such a layer carries no keys and values: each sequence slot has a convolution window (the last
K-1 inputs of its causal depthwise convolution) and a recurrent state [Hv, Dk, Dv] kept in fp32,
allocated once like the KV cache. A prompt pass that starts at position 0 starts from zeros, so
nothing a slot's previous sequence left behind is ever read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engine.models.common import Batch


@dataclass(frozen=True)
class LinearSpec:
    layers: tuple[int, ...]    # decoder layers that are linear attention
    conv_dim: int              # channels of the causal convolution (q, k and v together)
    kernel: int                # its width K
    heads: int                 # value heads Hv
    k_dim: int
    v_dim: int


class LinearStates:
    """conv [slots, C, K-1] (model dtype) and state [slots, Hv, Dk, Dv] (fp32) per linear layer."""

    def __init__(self, spec: LinearSpec, slots: int, dtype: torch.dtype, device: torch.device) -> None:
        self.spec = spec
        self.conv = {i: torch.zeros(slots, spec.conv_dim, spec.kernel - 1, dtype=dtype, device=device)
                     for i in spec.layers}
        self.state = {i: torch.zeros(slots, spec.heads, spec.k_dim, spec.v_dim, dtype=torch.float32,
                                     device=device) for i in spec.layers}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.conv.values(), *self.state.values()))

    @staticmethod
    def _fresh(batch: "Batch") -> bool:
        """One sequence whose pass starts at position 0: no state to continue."""
        if batch.single_slot is None:
            return False
        start = batch.start if batch.start is not None else int(batch.positions[0, 0])
        return start == 0

    def read(self, layer: int, batch: "Batch") -> tuple[torch.Tensor, torch.Tensor]:
        """(conv window [B, C, K-1], recurrent state [B, Hv, Dk, Dv]) of the batch's rows."""
        conv, state = self.conv[layer], self.state[layer]
        if self._fresh(batch):
            return conv.new_zeros(1, *conv.shape[1:]), state.new_zeros(1, *state.shape[1:])
        if batch.single_slot is not None:
            s = batch.single_slot
            return conv[s:s + 1], state[s:s + 1]
        return conv[batch.slots], state[batch.slots]

    def write(self, layer: int, batch: "Batch", conv: torch.Tensor, state: torch.Tensor) -> None:
        """Store the rows' new conv window [B, C, K-1] and state [B, Hv, Dk, Dv]."""
        if batch.single_slot is not None:
            s = batch.single_slot
            self.conv[layer][s].copy_(conv[0])
            self.state[layer][s].copy_(state[0])
        else:
            self.conv[layer][batch.slots] = conv.to(self.conv[layer].dtype)
            self.state[layer][batch.slots] = state
