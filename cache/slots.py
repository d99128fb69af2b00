"""Fixed pools of expert slots, allocated once at start-up: one contiguous buffer per expert.

A tier's byte budget becomes ``budget // slot_bytes`` slots in a single [slots, slot_bytes]
allocation, so a tier move is one read or one copy into a row, nothing is allocated per token,
and the bytes held can never exceed the budget.
"""
from __future__ import annotations

from typing import Optional

import torch

from cache.quant import ExpertFormat, ExpertWeights

ALIGN = 4096                  # O_DIRECT offset/length/address alignment (covers 512 B sectors too)


def aligned_empty(nbytes: int, align: int = ALIGN) -> torch.Tensor:
    """A uint8 CPU tensor of ``nbytes`` whose data pointer is a multiple of ``align``."""
    raw = torch.empty(nbytes + align, dtype=torch.uint8)
    shift = (-raw.data_ptr()) % align
    return raw[shift:shift + nbytes]


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
    """``num_slots`` expert buffers of ``fmt.slot_bytes`` bytes on ``device``, in one allocation.

    On CPU the storage starts on a 4 KiB boundary and quantized slots are 4 KiB multiples, so an
    O_DIRECT read lands straight in a slot. Pinned (page-locked) when ``pin`` is set, so
    host-to-device copies can run asynchronously. Only the engine thread acquires and releases;
    I/O threads write into slots they were given.
    """

    def __init__(self, num_slots: int, fmt: ExpertFormat, device: torch.device,
                 pin: bool = False) -> None:
        if num_slots < 1:
            raise BudgetError(f"a slot pool needs at least one slot, got {num_slots}")
        self.fmt = fmt
        self.slot_bytes = fmt.slot_bytes
        # [num_slots, slot_bytes] uint8: row s is slot s, contiguous
        if device.type == "cpu" and not pin:
            flat = aligned_empty(num_slots * self.slot_bytes)
        else:
            flat = torch.empty(num_slots * self.slot_bytes, dtype=torch.uint8, device=device,
                               pin_memory=pin and device.type == "cpu")
        self.storage = flat.view(num_slots, self.slot_bytes)
        self._views = [fmt.views(self.storage[s]) for s in range(num_slots)]
        self._free = list(range(num_slots - 1, -1, -1))   # pop() hands out slot 0 first
        self._taken = [False] * num_slots

    @property
    def num_slots(self) -> int:
        return self.storage.shape[0]

    @property
    def allocated_bytes(self) -> int:
        """Bytes of slot storage this pool holds (besides < 4 KiB of alignment slack on CPU)."""
        return self.storage.numel()

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
        """The flat uint8 [slot_bytes] buffer of ``slot``."""
        return self.storage[slot]

    def views(self, slot: int) -> ExpertWeights:
        """gate / up / down views of ``slot`` in the pool's format (made once at start-up)."""
        return self._views[slot]
