"""Fixed pools of expert slots, allocated once at start-up: one contiguous buffer per expert.

A tier's byte budget becomes ``budget // expert_bytes`` slots in a single [slots, 3*I*H]
allocation, so a tier move is one read or one copy into a row, nothing is allocated per token,
and the bytes held can never exceed the budget.
"""
from __future__ import annotations

from typing import Optional

import torch

from cache.provider import ExpertWeights, expert_views


class BudgetError(ValueError):
    """A tier's budget cannot hold what the model needs; the message names the budget field."""


def slot_count(budget: int, expert_bytes: int, minimum: int, field: str) -> int:
    """Slots a ``budget`` of bytes pays for; at least ``minimum`` (one layer's top-k experts)."""
    n = budget // expert_bytes
    if n < minimum:
        raise BudgetError(f"{field}={budget} bytes holds {n} experts of {expert_bytes} bytes; "
                          f"at least {minimum} are needed (one layer's top-k), i.e. "
                          f"{field} >= {minimum * expert_bytes} bytes")
    return n


class SlotPool:
    """``num_slots`` expert buffers of ``3*inter*hidden`` elements on ``device``.

    Pinned (page-locked) when ``pin`` is set, so host-to-device copies can run asynchronously.
    Only the engine thread acquires and releases; I/O threads write into slots they were given.
    """

    def __init__(self, num_slots: int, inter: int, hidden: int, dtype: torch.dtype,
                 device: torch.device, pin: bool = False) -> None:
        if num_slots < 1:
            raise BudgetError(f"a slot pool needs at least one slot, got {num_slots}")
        self.inter, self.hidden = inter, hidden
        self.numel = 3 * inter * hidden
        # [num_slots, 3*I*H]: row s is slot s, contiguous
        self.storage = torch.empty(num_slots, self.numel, dtype=dtype, device=device,
                                   pin_memory=pin and device.type == "cpu")
        self._views = [expert_views(self.storage[s], inter, hidden) for s in range(num_slots)]
        self._free = list(range(num_slots - 1, -1, -1))   # pop() hands out slot 0 first
        self._taken = [False] * num_slots

    @property
    def num_slots(self) -> int:
        return self.storage.shape[0]

    @property
    def slot_bytes(self) -> int:
        return self.numel * self.storage.element_size()

    @property
    def allocated_bytes(self) -> int:
        """Bytes this pool really holds (the storage backing every slot)."""
        return self.storage.untyped_storage().nbytes()

    @property
    def free_count(self) -> int:
        return len(self._free)

    def acquire(self) -> Optional[int]:
        """A free slot index, or None when every slot is taken."""
        if not self._free:
            return None
        slot = self._free.pop()
        self._taken[slot] = True
        return slot

    def release(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or not self._taken[slot]:
            raise ValueError(f"slot {slot} is not an acquired slot of this pool")
        self._taken[slot] = False
        self._free.append(slot)

    def buffer(self, slot: int) -> torch.Tensor:
        """The flat [3*I*H] buffer of ``slot``."""
        return self.storage[slot]

    def views(self, slot: int) -> ExpertWeights:
        """gate [I, H], up [I, H], down [H, I] views of ``slot`` (made once at start-up)."""
        return self._views[slot]
