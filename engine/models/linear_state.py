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
    """conv [slots, C, K-1] (model dtype) and state [slots, Hv, Dk, Dv] (fp32) per linear layer.

    With ``saved``, each slot has room for one more copy of its state, taken during a prompt pass
    (the engine saves it a few tokens before the prompt's end): a later request whose prompt
    shares the tokens up to there restarts from that copy, although the slot's live state went on
    through the reply (prefix caching on a thinking model, whose next turn drops the reply)."""

    def __init__(self, spec: LinearSpec, slots: int, dtype: torch.dtype, device: torch.device,
                 saved: bool = False) -> None:
        self.spec = spec
        # per slot, the position its state has reached (on the host): a pass must continue from
        # there or start a new sequence at 0, so a state is never read out of order
        self.reached = [0] * slots
        self.conv = {i: torch.zeros(slots, spec.conv_dim, spec.kernel - 1, dtype=dtype, device=device)
                     for i in spec.layers}
        self.state = {i: torch.zeros(slots, spec.heads, spec.k_dim, spec.v_dim, dtype=torch.float32,
                                     device=device) for i in spec.layers}
        # per slot, the position of its saved copy (-1: none)
        self.saved_at = [-1] * slots
        self._saved = ({i: (torch.zeros_like(self.conv[i]), torch.zeros_like(self.state[i]))
                        for i in spec.layers} if saved else {})

    @property
    def nbytes(self) -> int:
        tensors = (*self.conv.values(), *self.state.values(), *(t for p in self._saved.values() for t in p))
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def saves(self) -> bool:
        return bool(self._saved)

    def save(self, slot: int) -> None:
        """Keep a copy of ``slot``'s state where it has reached."""
        for i, (conv, state) in self._saved.items():
            conv[slot].copy_(self.conv[i][slot])
            state[slot].copy_(self.state[i][slot])
        self.saved_at[slot] = self.reached[slot]

    def restore(self, slot: int) -> None:
        """Take ``slot``'s state back to its saved copy."""
        if self.saved_at[slot] < 0:
            raise RuntimeError(f"slot {slot} has no saved linear-attention state")
        for i, (conv, state) in self._saved.items():
            self.conv[i][slot].copy_(conv[slot])
            self.state[i][slot].copy_(state[slot])
        self.reached[slot] = self.saved_at[slot]

    def forget(self, slot: int, beyond: int) -> None:
        """Drop ``slot``'s saved copy if it is past position ``beyond`` (a new sequence's tokens
        differ from there on)."""
        if self.saved_at[slot] > beyond:
            self.saved_at[slot] = -1

    @staticmethod
    def starts(batch: "Batch") -> list[tuple[int, int]]:
        """(slot, first position) of each row: one sequence's pass, or one decode token a row."""
        if batch.single_slot is not None:
            start = batch.start if batch.start is not None else int(batch.positions[0, 0])
            return [(batch.single_slot, start)]
        if batch.seq_rows is None:
            raise NotImplementedError("linear attention: a pass of several sequences' prompts")
        return [(s, n - 1) for s, n in batch.seq_rows]

    def _check(self, layer: int, batch: "Batch") -> bool:
        """Whether the pass starts a new sequence; raises if a row does not continue its slot."""
        rows = self.starts(batch)
        for s, start in rows:
            if start != 0 and start != self.reached[s]:
                raise RuntimeError(f"linear-attention state of slot {s} (layer {layer}) is at position "
                                   f"{self.reached[s]}; a pass cannot continue it from {start}")
        return len(rows) == 1 and rows[0][1] == 0

    def read(self, layer: int, batch: "Batch") -> tuple[torch.Tensor, torch.Tensor]:
        """(conv window [B, C, K-1], recurrent state [B, Hv, Dk, Dv]) of the batch's rows."""
        conv, state = self.conv[layer], self.state[layer]
        if self._check(layer, batch):
            return conv.new_zeros(1, *conv.shape[1:]), state.new_zeros(1, *state.shape[1:])
        if batch.single_slot is not None:
            s = batch.single_slot
            return conv[s:s + 1], state[s:s + 1]
        return conv[batch.slots], state[batch.slots]

    def write(self, layer: int, batch: "Batch", conv: torch.Tensor, state: torch.Tensor) -> None:
        """Store the rows' new conv window [B, C, K-1] and state [B, Hv, Dk, Dv]; after the last
        linear layer, each slot's state has reached the end of the pass."""
        if layer == self.spec.layers[-1]:
            t = batch.positions.shape[1]
            for s, start in self.starts(batch):
                self.reached[s] = start + t
        if batch.single_slot is not None:
            s = batch.single_slot
            self.conv[layer][s].copy_(conv[0])
            self.state[layer][s].copy_(state[0])
        else:
            self.conv[layer][batch.slots] = conv.to(self.conv[layer].dtype)
            self.state[layer][batch.slots] = state
